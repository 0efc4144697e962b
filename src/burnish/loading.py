"""`FastModel.from_pretrained`: resolve a model, load it with mlx-lm, keep dtypes.

A model loaded here keeps the dtype of every parameter exactly as stored in
its checkpoint (nothing is upcast), so generation runs at stock mlx-lm speed.
Norms that need float32 *math* for parity (Gemma 3) get it per instance from
`burnish.precision.apply_architecture_norms`, without float32 weights.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .errors import BurnishError, read_json

# Unsloth arguments that have no meaning on MLX: accepted with a warning so
# that Unsloth notebooks run unchanged.
UNSLOTH_NOOP_ARGS = {
    "token", "device_map", "attn_implementation", "fix_tokenizer",
    "use_exact_model_name", "fast_inference", "gpu_memory_utilization",
    "float8_kv_cache", "max_lora_rank", "disable_log_stats", "resize_model_vocab",
    "use_gradient_checkpointing", "random_state", "local_files_only",
    "load_in_16bit", "rope_scaling", "offload_embedding", "unsloth_vllm_standby",
}

DTYPES = {
    "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
    "float16": mx.float16, "fp16": mx.float16, "half": mx.float16,
    "float32": mx.float32, "fp32": mx.float32, "float": mx.float32,
}

QUANT_GROUP_SIZE = 64

# Hugging Face file patterns a model folder needs (as mlx-lm fetches them).
_CACHE_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model",
                   "*.tiktoken", "*.txt", "*.jsonl", "*.jinja"]


@dataclass
class LoadInfo:
    """What burnish knows about where a model came from (kept on the model)."""

    path: Path
    config: dict
    model_type: str
    max_seq_length: int
    quantization: dict | None = None
    is_vision: bool = False
    param_dtypes: dict = field(default_factory=dict)  # path -> checkpoint dtype

    # mx.Dtype objects do not pickle: store their names so that models stay
    # picklable / deep-copyable.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["param_dtypes"] = {k: str(v).split(".")[-1]
                                 for k, v in self.param_dtypes.items()}
        return state

    def __setstate__(self, state):
        state["param_dtypes"] = {k: getattr(mx, v)
                                 for k, v in state["param_dtypes"].items()}
        self.__dict__.update(state)


def parse_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    key = str(dtype).lower().removeprefix("mlx.core.").removeprefix("torch.")
    if key not in DTYPES:
        raise BurnishError(
            f"dtype={dtype!r} is not supported; use one of bfloat16, float16, float32"
        )
    return DTYPES[key]


def resolve_model_path(model_name) -> Path:
    """A local folder, or a hub id found in the local Hugging Face cache."""
    path = Path(model_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BurnishError(f"{path}: is a file; expected a model folder")
        if not (path / "config.json").exists():
            raise BurnishError(f"{path}: no config.json in this folder (not a model folder)")
        return path
    name = str(model_name)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise BurnishError(f"{name}: model folder not found")
    from huggingface_hub import snapshot_download

    try:
        # HF_HUB_CACHE is read here, not at import, so that it can be changed.
        path = Path(snapshot_download(name, local_files_only=True,
                                      cache_dir=os.environ.get("HF_HUB_CACHE"),
                                      allow_patterns=_CACHE_PATTERNS))
    except Exception:
        raise BurnishError(
            f"{name}: not a local folder and not in the local Hugging Face cache; "
            "burnish never downloads - fetch it first (e.g. `hf download "
            f"{name}`) or pass a folder"
        ) from None
    if not (path / "config.json").exists():
        raise BurnishError(f"{name}: cached snapshot {path} has no config.json")
    return path


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise BurnishError(f"{config_file}: expected a JSON object")
    if "model_type" not in config:
        raise BurnishError(f"{config_file}: field 'model_type' is missing")
    return config


def check_safetensors(path: Path) -> list[Path]:
    """Check every weight file's header and size, so a truncated or corrupt
    download is reported by file name instead of as a deep loader error."""
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name.startswith("model")] or files
    if not files:
        raise BurnishError(f"{path}: no *.safetensors weight files in this folder")
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise BurnishError(f"{file}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise BurnishError(f"{file}: truncated safetensors file (header "
                                   f"says {header_len} bytes, file has {size})")
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BurnishError(f"{file}: corrupt safetensors header") from None
        end = max((v["data_offsets"][1] for k, v in header.items()
                   if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise BurnishError(f"{file}: truncated safetensors file (expected "
                               f"{8 + header_len + end} bytes, found {size})")
    return files


def check_unknown_kwargs(kwargs: dict, where: str, noop: set) -> None:
    unknown = sorted(set(kwargs) - noop)
    if unknown:
        raise TypeError(f"{where}: unknown argument(s) {', '.join(unknown)}")
    for name in sorted(kwargs):
        warnings.warn(f"{where}: argument '{name}' has no effect with burnish/MLX "
                      "and is ignored", stacklevel=3)


def cast_floating(model: nn.Module, dtype: mx.Dtype) -> None:
    def cast(x):
        return x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_map(cast, model.parameters()))


def quantize_linears(model: nn.Module, bits: int) -> dict:
    """Quantise linear layers only: embeddings, output head and norms stay."""
    skipped = []

    def predicate(path, module):
        if not isinstance(module, nn.Linear) or path.split(".")[-1] == "lm_head":
            return False
        if module.weight.shape[-1] % QUANT_GROUP_SIZE:
            skipped.append(path)
            return False
        return True

    nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=bits, class_predicate=predicate)
    if skipped:
        warnings.warn(f"{len(skipped)} linear layer(s) kept unquantised: input size "
                      f"not a multiple of {QUANT_GROUP_SIZE} (e.g. {skipped[0]})")
    return {"group_size": QUANT_GROUP_SIZE, "bits": bits, "mode": "affine"}


def _load_mlx_lm(path: Path, config: dict, trust_remote_code: bool):
    from mlx_lm.utils import _get_classes, load_model, load_tokenizer

    try:
        _get_classes(config)
    except ValueError:
        import mlx_lm

        raise BurnishError(f"{path / 'config.json'}: model_type "
                           f"'{config['model_type']}' is not supported by mlx-lm "
                           f"{mlx_lm.__version__}") from None
    try:
        model, config = load_model(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise BurnishError(f"{path}: cannot load weights ({exc})") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def from_pretrained(model_name, max_seq_length: int = 2048, dtype=None,
                    load_in_4bit: bool = False, load_in_8bit: bool = False,
                    full_finetuning: bool = False, trust_remote_code: bool = False,
                    **kwargs) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer; returns `(model, tokenizer)`.

    `model_name` is a Hugging Face-layout folder (or an mlx-lm converted one),
    or a hub id already in the local Hugging Face cache (never downloaded).
    `dtype=None` keeps the checkpoint's dtypes; a dtype casts floating weights.
    `load_in_4bit`/`load_in_8bit` quantise linear layers (affine, group 64).
    Without `full_finetuning` all parameters are frozen until
    `get_peft_model` chooses what to train.
    """
    check_unknown_kwargs(kwargs, "from_pretrained", UNSLOTH_NOOP_ARGS)
    if load_in_4bit and load_in_8bit:
        raise BurnishError("from_pretrained: choose one of load_in_4bit and load_in_8bit")
    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise BurnishError(f"from_pretrained: max_seq_length={max_seq_length!r} "
                           "must be a positive integer")
    dtype = parse_dtype(dtype)
    path = resolve_model_path(model_name)
    config = read_config(path)
    check_safetensors(path)
    if is_vision_config(config):
        from .vision import load_vision_model

        return load_vision_model(path, config, max_seq_length=max_seq_length,
                                 dtype=dtype, load_in_4bit=load_in_4bit,
                                 load_in_8bit=load_in_8bit,
                                 full_finetuning=full_finetuning,
                                 trust_remote_code=trust_remote_code)
    model, tokenizer, config = _load_mlx_lm(path, config, trust_remote_code)
    finish_loading(model, path, config, max_seq_length=max_seq_length, dtype=dtype,
                   load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                   full_finetuning=full_finetuning)
    return model, tokenizer


def finish_loading(model, path: Path, config: dict, *, max_seq_length: int, dtype,
                   load_in_4bit: bool, load_in_8bit: bool, full_finetuning: bool,
                   quantize_target=None, is_vision: bool = False) -> None:
    """What every loader does after building the model: optional cast and
    quantisation (of `quantize_target`, default the whole model), the
    architecture norm math, freezing, and the `LoadInfo` record."""
    from .precision import apply_architecture_norms

    quantization = config.get("quantization")
    if dtype is not None:
        cast_floating(model, dtype)
    if load_in_4bit or load_in_8bit:
        if quantization:
            warnings.warn(f"{path} is already quantised ({quantization.get('bits')}-bit); "
                          "load_in_4bit/load_in_8bit ignored")
        else:
            quantization = quantize_linears(quantize_target or model,
                                            4 if load_in_4bit else 8)
    if full_finetuning and quantization:
        raise BurnishError("full_finetuning=True needs an unquantised model; "
                           "use LoRA on the quantised model (QLoRA) instead")
    apply_architecture_norms(model)
    mx.eval(model.parameters())
    if full_finetuning:
        model.unfreeze()
    else:
        model.freeze()
    model.eval()
    model._burnish = LoadInfo(
        path=path, config=config, model_type=config["model_type"],
        max_seq_length=max_seq_length, quantization=quantization, is_vision=is_vision,
        param_dtypes={k: v.dtype for k, v in tree_flatten(model.parameters())},
    )


def is_vision_config(config: dict) -> bool:
    """A vision-language checkpoint (loaded through mlx-vlm)."""
    return "vision_config" in config


def load_info(model: nn.Module) -> LoadInfo | None:
    """The `LoadInfo` of a model loaded by burnish, else None."""
    return getattr(model, "_burnish", None)


class FastModel:
    """Unsloth-style entry points (`FastLanguageModel` is the same class)."""

    from_pretrained = staticmethod(from_pretrained)

    @staticmethod
    def get_peft_model(model, **kwargs):
        from .peft import get_peft_model

        return get_peft_model(model, **kwargs)

    @staticmethod
    def for_inference(model):
        model.eval()
        return model

    @staticmethod
    def for_training(model):
        model.train()
        return model


FastLanguageModel = FastModel
