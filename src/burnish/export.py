"""Files other tools read: adapters, merged models, GGUF.

* Adapters use mlx-lm's layout (`adapters.safetensors` + `adapter_config.json`)
  so that stock `mlx_lm.load(base, adapter_path=...)` loads them.
* A merged model is a Hugging Face folder in the checkpoint's own dtypes
  (norms included: never float32 unless the checkpoint was), which stock
  `mlx_lm.load` reads.
* GGUF goes through mlx-lm's converter, for the architectures it supports.

All saves are atomic, and the folder a model was loaded from is never
written unless `overwrite_source=True`.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .atomic import atomic_directory, same_folder
from .errors import BurnishError, read_json
from .loading import load_info, parse_dtype
from .peft import ADAPTER_LEAVES, PeftConfig, peft_config

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
GGUF_TYPES = ("llama", "mistral", "mixtral")  # what mlx-lm's converter handles


def _check_target(model, path: Path, overwrite_source: bool) -> None:
    info = load_info(model)
    if info is not None and same_folder(info.path, path) and not overwrite_source:
        raise BurnishError(f"{path}: this is the folder the model was loaded from; "
                           "choose another folder or pass overwrite_source=True")


def adapter_weights(model) -> dict:
    """The adapter parameters (LoRA a/b, DoRA magnitudes) by path."""
    return {k: v for k, v in tree_flatten(model.parameters())
            if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def save_adapters(model, path, overwrite_source: bool = False) -> Path:
    """Write `adapters.safetensors` + `adapter_config.json` (mlx-lm layout)."""
    config = peft_config(model)
    if config is None:
        raise BurnishError("save_adapters: the model has no adapters "
                           "(call get_peft_model first)")
    path = Path(path)
    _check_target(model, path, overwrite_source)
    weights = adapter_weights(model)
    adapter_config = config.adapter_config()
    info = load_info(model)
    if info is not None:
        adapter_config["base_model"] = str(info.path)
    adapter_config["burnish"] = config.to_dict()
    with atomic_directory(path) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights,
                            metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    return path


def load_adapters(model, path):
    """Add the adapters saved at `path` (by burnish or mlx-lm) to `model`."""
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).exists():
            raise BurnishError(f"{path}: no {name} in this folder")
    saved = read_json(path / ADAPTER_CONFIG)
    if peft_config(model) is not None:
        raise BurnishError("load_adapters: the model already has adapters")
    try:
        mlx_load_adapters(model, str(path))
    except ValueError as exc:
        raise BurnishError(f"{path}: adapters do not fit this model ({exc})") from None
    lora = saved.get("lora_parameters", {})
    rank = lora.get("rank", 8)
    model._burnish_peft = PeftConfig(
        fine_tune_type=saved.get("fine_tune_type", "lora"), r=rank,
        lora_alpha=lora.get("scale", 20.0) * rank, scale=lora.get("scale", 20.0),
        dropout=lora.get("dropout", 0.0), use_rslora=False,
        num_layers=saved.get("num_layers", -1), keys=lora.get("keys") or [])
    model.freeze()
    model.unfreeze(keys=list(ADAPTER_LEAVES), strict=False)
    model.eval()
    return model


def merged_weights(model, dtype=None, dequantize: bool = False) -> dict:
    """Weights with adapters folded in, in the checkpoint's dtypes (or `dtype`).

    Folds adapters on a temporary module swap and restores the model's own
    modules afterwards, so the adapted model stays usable.
    """
    dtype = parse_dtype(dtype)
    info = load_info(model)
    stored = info.param_dtypes if info is not None else {}
    adapted = [(n, m) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if adapted:
        model.update_modules(tree_unflatten(
            [(n, m.fuse(dequantize=dequantize)) for n, m in adapted]))
    try:
        if dequantize:
            from mlx_lm.utils import dequantize_model

            quantized = [(n, m) for n, m in model.named_modules()
                         if isinstance(m, nn.QuantizedLinear)]
            dequantize_model(model)  # replaces the modules in place
        weights = dict(tree_flatten(model.parameters()))
    finally:
        if dequantize:
            model.update_modules(tree_unflatten(quantized))
        if adapted:
            model.update_modules(tree_unflatten(adapted))

    def target(name, value):
        if not mx.issubdtype(value.dtype, mx.floating):
            return value
        want = dtype or stored.get(name)
        if want is None or not mx.issubdtype(want, mx.floating):
            # A dequantised weight: its scales carry the original float dtype.
            want = stored.get(name.rsplit(".", 1)[0] + ".scales", value.dtype)
        return value.astype(want)

    return {k: target(k, v) for k, v in weights.items()}


def save_merged(model, tokenizer, path, dtype=None, dequantize: bool = False,
                overwrite_source: bool = False) -> Path:
    """Write a Hugging Face folder with the adapters merged into the weights."""
    from mlx_lm.utils import make_shards, save_config

    info = load_info(model)
    if info is None:
        raise BurnishError("save_merged: the model was not loaded by burnish "
                           "(use FastModel.from_pretrained)")
    path = Path(path)
    _check_target(model, path, overwrite_source)
    weights = merged_weights(model, dtype=dtype, dequantize=dequantize)
    config = dict(info.config)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif info.quantization and "quantization" not in config:
        config["quantization"] = dict(info.quantization)
    floating = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    if len(floating) == 1:
        config["torch_dtype"] = str(floating.pop()).split(".")[-1]
    with atomic_directory(path) as tmp:
        shards = make_shards(weights)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))])
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                 "weight_map": {}}
        for name, shard in zip(names, shards):
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            index["weight_map"].update({k: name for k in shard})
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        save_config(config, tmp / "config.json", keep_vision_config=info.is_vision)
        tokenizer.save_pretrained(str(tmp))
        for pattern in ("*.py", "generation_config.json"):
            for file in glob.glob(str(info.path / pattern)):
                shutil.copy(file, tmp)
    return path


def export_gguf(model, tokenizer, path, overwrite_source: bool = False) -> Path:
    """Write a GGUF file (float16) through mlx-lm's converter.

    Supported for the architectures mlx-lm converts (llama, mistral, mixtral)
    and unquantised weights.
    """
    from mlx_lm.gguf import convert_to_gguf

    info = load_info(model)
    if info is None:
        raise BurnishError("export_gguf: the model was not loaded by burnish")
    if info.model_type not in GGUF_TYPES:
        raise BurnishError(f"export_gguf: model_type '{info.model_type}' is not "
                           f"supported by mlx-lm's GGUF export (supported: "
                           f"{', '.join(GGUF_TYPES)})")
    path = Path(path)
    if path.suffix != ".gguf":
        raise BurnishError(f"export_gguf: {path} should end in .gguf")
    weights = merged_weights(model, dequantize=True)
    config = {k: v for k, v in info.config.items() if k != "quantization"}
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    # The converter reads tokenizer.json from a folder: give it a clean one.
    with atomic_directory(path.parent / f".{path.stem}.tokenizer", replace=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
        out = tmp / path.name
        convert_to_gguf(tmp, weights, config, str(out))
        out.replace(path)
    shutil.rmtree(path.parent / f".{path.stem}.tokenizer", ignore_errors=True)
    return path
