"""FastModel.from_pretrained: dtypes kept, parity with stock mlx-lm, quantisation, errors."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load

import burnish
from burnish import FastLanguageModel, FastModel
from burnish.errors import BurnishError

TYPES = ["llama", "qwen3", "gemma3_text", "phi3"]
PROMPT = mx.array([[1, 5, 17, 42, 99, 7, 3, 250]])


def checkpoint_dtypes(path):
    weights = {}
    for f in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    return {k: v.dtype for k, v in weights.items()}


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("model_type", TYPES)
def test_dtypes_and_logits_match_stock(model_factory, model_type, dtype):
    path = model_factory(model_type, dtype)
    model, tokenizer = FastModel.from_pretrained(path)
    ours = dict(tree_flatten(model.parameters()))
    stored = checkpoint_dtypes(path)
    assert ours, "no parameters"
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name} is {value.dtype}"
    assert {k for k in stored} >= {k for k in ours if k in stored}

    stock, _ = mlx_load(str(path))
    logits, ref = model(PROMPT), stock(PROMPT)
    assert logits.dtype == dtype == ref.dtype
    if model_type == "gemma3_text" and dtype == mx.bfloat16:
        # burnish computes Gemma 3's (1 + w) norm scale in float32 (closer to
        # the float32 reference, tested in test_precision); allow bf16 noise.
        assert mx.allclose(logits.astype(mx.float32), ref.astype(mx.float32),
                           atol=0.1, rtol=0.05)
    else:
        assert mx.array_equal(logits, ref)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "gemma3_text"])
def test_greedy_generation_equals_stock(model_factory, model_type):
    dtype = mx.float32 if model_type == "gemma3_text" else mx.bfloat16
    path = model_factory(model_type, dtype)
    model, tokenizer = FastLanguageModel.from_pretrained(path)
    stock, stock_tok = mlx_load(str(path))
    prompt = "the quick brown fox"
    ours = burnish.generate(model, tokenizer, prompt, max_new_tokens=24)
    ref = mlx_generate(stock, stock_tok, prompt, max_tokens=24)
    assert ours == ref
    assert len(ours) > 0


def test_explicit_dtype_casts_floating_weights(model_factory):
    path = model_factory("llama", mx.bfloat16)
    model, _ = FastModel.from_pretrained(path, dtype="float32")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert model(PROMPT).dtype == mx.float32


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.3)])
def test_quantised_load(model_factory, bits, tol):
    path = model_factory("llama", mx.float32)
    full, _ = FastModel.from_pretrained(path)
    model, _ = FastModel.from_pretrained(path, **{f"load_in_{bits}bit": True})
    kinds = {name: type(m) for name, m in model.named_modules()}
    linears = [n for n, t in kinds.items() if t in (nn.Linear, nn.QuantizedLinear)]
    assert linears
    for name in linears:
        expect = nn.Linear if name == "lm_head" else nn.QuantizedLinear
        assert kinds[name] is expect, name
        if expect is nn.QuantizedLinear:
            module = dict(model.named_modules())[name]
            assert (module.bits, module.group_size) == (bits, 64)
    assert kinds["model.embed_tokens"] is nn.Embedding
    assert kinds["model.norm"] is nn.RMSNorm
    a, b = model(PROMPT), full(PROMPT)
    rel = (mx.abs(a - b).max() / mx.abs(b).max()).item()
    assert rel < tol, rel
    assert model._burnish.quantization == {"group_size": 64, "bits": bits, "mode": "affine"}


def test_frozen_unless_full_finetuning(model_factory):
    path = model_factory("llama", mx.bfloat16)
    model, _ = FastModel.from_pretrained(path)
    assert tree_flatten(model.trainable_parameters()) == []
    model, _ = FastModel.from_pretrained(path, full_finetuning=True)
    assert len(tree_flatten(model.trainable_parameters())) == len(
        tree_flatten(model.parameters()))


def test_sharded_checkpoint(model_factory, tmp_path):
    src = model_factory("qwen3", mx.bfloat16)
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(dst / fname), {k: weights[k] for k in part})
        index["weight_map"].update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    a, _ = FastModel.from_pretrained(dst)
    b, _ = FastModel.from_pretrained(src)
    assert mx.array_equal(a(PROMPT), b(PROMPT))


def test_hub_id_from_local_cache(model_factory, tmp_path, monkeypatch):
    src = model_factory("llama", mx.bfloat16)
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(src, snap)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model, _ = FastModel.from_pretrained("tiny-org/tiny-llama")
    assert model._burnish.path == snap
    with pytest.raises(BurnishError, match="not in the local Hugging Face cache"):
        FastModel.from_pretrained("tiny-org/not-there")


def test_unknown_and_unsloth_kwargs(model_factory):
    path = model_factory("llama", mx.bfloat16)
    with pytest.raises(TypeError, match="unknown argument.*bogus_flag"):
        FastModel.from_pretrained(path, bogus_flag=1)
    with pytest.warns(UserWarning, match="'token' has no effect"):
        FastModel.from_pretrained(path, token="hf_x")


def bad_folders(model_factory, tmp_path):
    good = model_factory("llama", mx.bfloat16)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    unknown = tmp_path / "unknown_type"
    shutil.copytree(good, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (unknown / "config.json").write_text(json.dumps(cfg))
    bad_json = tmp_path / "bad_json"
    shutil.copytree(good, bad_json)
    (bad_json / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {
        "missing": (tmp_path / "does_not_exist", "model folder not found"),
        "no_config": (no_config, "no config.json"),
        "unknown_type": (unknown, "model_type 'no_such_arch' is not supported"),
        "bad_json": (bad_json, r"config\.json:3: invalid JSON \(.*, column 3\)"),
        "truncated": (truncated, "model.safetensors: truncated safetensors file"),
        "hub": ("nobody-here/missing-model", "not in the local Hugging Face cache"),
    }


@pytest.mark.parametrize("case", ["missing", "no_config", "unknown_type", "bad_json",
                                  "truncated", "hub"])
def test_bad_input_errors(model_factory, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path, message = bad_folders(model_factory, tmp_path)[case]
    with pytest.raises(BurnishError, match=message):
        FastModel.from_pretrained(path)


@pytest.mark.parametrize("case", ["missing", "unknown_type", "truncated", "hub"])
def test_cli_bad_input_one_line(model_factory, tmp_path, case):
    path, message = bad_folders(model_factory, tmp_path)[case]
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "burnish.cli", "generate", "--model", str(path),
         "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("burnish: error:"), proc.stderr
    assert message.split(":")[-1].strip() in lines[0]


def test_loaded_model_is_picklable(model_factory):
    import copy
    import pickle

    model, _ = FastModel.from_pretrained(model_factory("llama", mx.bfloat16))
    clone = pickle.loads(pickle.dumps(model))
    assert clone._burnish.param_dtypes == model._burnish.param_dtypes
    assert copy.deepcopy(model)._burnish.model_type == "llama"
