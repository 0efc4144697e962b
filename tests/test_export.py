"""Adapters, merged folders and GGUF that stock mlx-lm reads."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load

import burnish
from burnish.errors import BurnishError
from burnish.export import export_gguf, load_adapters, save_adapters, save_merged

PROMPT = mx.array([[1, 5, 17, 42, 99, 7, 3, 250]])


def adapted(path, seed=0, **kw):
    model, tok = burnish.FastModel.from_pretrained(path)
    model = burnish.FastModel.get_peft_model(model, r=4, lora_alpha=8, **kw)
    # LoRA B starts at zero: give the adapters a visible effect.
    mx.random.seed(seed)
    updates = [(k, 0.05 * mx.random.normal(v.shape).astype(v.dtype))
               for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(updates, strict=False)
    return model, tok


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_round_trip_through_stock_mlx_lm(model_factory, tmp_path, use_dora):
    base = model_factory("llama", mx.float32)
    model, tok = adapted(base, use_dora=use_dora)
    ours = model(PROMPT)
    plain, _ = burnish.FastModel.from_pretrained(base)
    assert not mx.allclose(ours, plain(PROMPT), atol=1e-4)  # the adapters matter
    out = save_adapters(model, tmp_path / "adapters")
    assert (out / "adapters.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if use_dora else "lora")
    stock, _ = mlx_load(str(base), adapter_path=str(out))
    assert mx.allclose(stock(PROMPT), ours, atol=1e-5)
    fresh, _ = burnish.FastModel.from_pretrained(base)
    load_adapters(fresh, out)
    assert mx.allclose(fresh(PROMPT), ours, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_merged_folder_keeps_checkpoint_dtypes(model_factory, tmp_path, model_type):
    base = model_factory(model_type, mx.bfloat16)
    model, tok = adapted(base)
    with burnish.training_precision(model):  # merged output must not keep fp32 norms
        out = save_merged(model, tok, tmp_path / "merged")
    stock, _ = mlx_load(str(out))
    for name, value in tree_flatten(stock.parameters()):
        assert value.dtype == mx.bfloat16, name
    ours = model(PROMPT).astype(mx.float32)
    ref = stock(PROMPT).astype(mx.float32)
    # merged bf16 weights differ from base + LoRA computed separately only by rounding
    assert np.corrcoef(np.array(ours).ravel(), np.array(ref).ravel())[0, 1] > 0.99
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # the adapted model is still adapted after merging
    assert any("lora_a" in k for k, _ in tree_flatten(model.parameters()))


def test_merged_float32_equals_adapted(model_factory, tmp_path):
    base = model_factory("qwen3", mx.float32)
    model, tok = adapted(base)
    out = save_merged(model, tok, tmp_path / "merged")
    stock, _ = mlx_load(str(out))
    assert mx.allclose(stock(PROMPT), model(PROMPT), atol=1e-4)


def test_merged_quantised_dequantize(model_factory, tmp_path):
    base = model_factory("llama", mx.float32)
    model, tok = burnish.FastModel.from_pretrained(base, load_in_4bit=True)
    model = burnish.FastModel.get_peft_model(model, r=4)
    out = save_merged(model, tok, tmp_path / "q", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    stock, _ = mlx_load(str(out))
    assert mx.allclose(stock(PROMPT), model(PROMPT), atol=1e-3)
    out = save_merged(model, tok, tmp_path / "q4")
    stock, _ = mlx_load(str(out))
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert isinstance(stock.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    # re-quantising the merged weight adds 4-bit rounding (as mlx-lm's fuse does)
    ref = model(PROMPT)
    assert (mx.abs(stock(PROMPT) - ref).max() / mx.abs(ref).max()).item() < 0.05


def test_never_overwrites_the_source_folder(model_factory, tmp_path):
    base = model_factory("llama", mx.bfloat16)
    model, tok = adapted(base)
    before = (base / "model.safetensors").read_bytes()
    with pytest.raises(BurnishError, match="folder the model was loaded from"):
        save_merged(model, tok, base)
    assert (base / "model.safetensors").read_bytes() == before


def test_gguf_for_llama_and_clear_error_otherwise(model_factory, tmp_path):
    model, tok = adapted(model_factory("llama", mx.bfloat16))
    out = export_gguf(model, tok, tmp_path / "model.gguf")
    assert out.read_bytes()[:4] == b"GGUF"
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers
    model, tok = burnish.FastModel.from_pretrained(model_factory("qwen3", mx.bfloat16))
    with pytest.raises(BurnishError, match="model_type 'qwen3' is not supported"):
        export_gguf(model, tok, tmp_path / "q.gguf")


def test_save_adapters_needs_adapters(model_factory, tmp_path):
    model, _ = burnish.FastModel.from_pretrained(model_factory("llama", mx.bfloat16))
    with pytest.raises(BurnishError, match="no adapters"):
        save_adapters(model, tmp_path / "a")


def test_cli_export_merged_and_gguf(model_factory, tmp_path):
    import subprocess
    import sys

    base = model_factory("llama", mx.bfloat16)
    model, tok = adapted(base)
    save_adapters(model, tmp_path / "ad")
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "export", "--model",
                           str(base), "--adapters", str(tmp_path / "ad"), "--out",
                           str(tmp_path / "merged"), "--gguf", str(tmp_path / "m.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    stock, _ = mlx_load(str(tmp_path / "merged"))
    assert {v.dtype for _, v in tree_flatten(stock.parameters())} == {mx.bfloat16}
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "export", "--model",
                           str(base), "--adapters", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("burnish: error:") and "nope" in proc.stderr
