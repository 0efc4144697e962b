"""`get_peft_model`: LoRA / DoRA / QLoRA adapters on mlx-lm models.

The adapter layers are mlx-lm's own (`LoRALinear`, `DoRALinear`,
`LoRASwitchLinear`), installed with mlx-lm's `linear_to_lora_layers`, so an
adapted model has exactly the parameter paths that `mlx_lm.load(...,
adapter_path=...)` builds and the recorded config is mlx-lm's
`adapter_config.json` layout.

Gradient checkpointing is per block *instance*: each transformer block gets a
cached subclass of its own class whose `__call__` recomputes the block in the
backward pass. No shared class is patched, and it only checkpoints while the
block is in training mode, so inference after training is not slowed down.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .errors import BurnishError

# Layers that "all-linear" and named targets may wrap (mlx-lm's own set,
# minus embeddings: "all-linear" means linear maps only).
_LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
_OUTPUT_HEADS = {"lm_head", "output", "embed_out"}
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")

_ANY = object()
# Unsloth / PEFT arguments that have no meaning here: accepted (with a
# warning) only with the value that makes them a no-op.
UNSLOTH_ARGS = {
    "bias": ("none",),
    "loftq_config": (None, {}),
    "max_seq_length": _ANY,  # set it in from_pretrained / TrainingConfig
    "modules_to_save": (None, []),
    "init_lora_weights": (True,),
    "task_type": _ANY,
    "temporary_location": _ANY,
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
}


@dataclass
class PeftConfig:
    """What `get_peft_model` did, kept on the model as `model._burnish_peft`."""

    fine_tune_type: str  # "lora" | "dora"
    r: int
    lora_alpha: float
    scale: float  # the multiplier mlx-lm's layers apply: alpha/r or alpha/sqrt(r)
    dropout: float
    use_rslora: bool
    num_layers: int  # adapters in the last `num_layers` blocks
    keys: list = field(default_factory=list)  # block-relative module paths
    target_modules: object = "all-linear"
    gradient_checkpointing: bool = False
    # Which layers (Unsloth's names). For vision-language models `keys` are
    # full module paths (mlx-vlm's adapter layout); for text models they are
    # block-relative (mlx-lm's).
    finetune_vision_layers: bool = False
    finetune_language_layers: bool = True
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True

    def adapter_config(self) -> dict:
        """mlx-lm's adapter_config.json content for these adapters."""
        return {
            "fine_tune_type": self.fine_tune_type,
            "num_layers": self.num_layers,
            "lora_parameters": {
                "rank": self.r,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": list(self.keys),
            },
        }

    def to_dict(self) -> dict:
        return asdict(self)


def peft_config(model) -> PeftConfig | None:
    return getattr(model, "_burnish_peft", None)


def transformer_blocks(model) -> list:
    """The list of transformer blocks (mlx-lm models expose `model.layers`)."""
    for owner in (model, getattr(model, "language_model", None)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, (list, tuple)) and layers:
            return list(layers)
    raise BurnishError(
        f"{type(model).__name__}: cannot find its transformer blocks "
        "(expected a `layers` list, as mlx-lm models have)"
    )


def _is_adaptable(module) -> bool:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, _LINEAR_TYPES + (SwitchLinear, QuantizedSwitchLinear)):
        return True
    return hasattr(module, "to_lora") and not isinstance(module, nn.Embedding)


def _linear_paths(block) -> list[str]:
    return [
        path
        for path, module in block.named_modules()
        if path and _is_adaptable(module) and path.split(".")[-1] not in _OUTPUT_HEADS
    ]


def _select_keys(blocks, target_modules) -> list[str]:
    """Block-relative paths of the linear layers that `target_modules` names."""
    available = sorted({p for b in blocks for p in _linear_paths(b)})
    if target_modules in ("all-linear", "all_linear", None):
        return available
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not isinstance(target_modules, (list, tuple, set)) or not all(
        isinstance(t, str) for t in target_modules
    ):
        raise BurnishError(
            f"target_modules={target_modules!r}: expected \"all-linear\" or a list "
            "of module names such as ['q_proj', 'v_proj']"
        )
    keys, unknown = set(), []
    for name in target_modules:
        hits = [p for p in available if p == name or p.endswith("." + name)]
        if not hits:
            unknown.append(name)
        keys.update(hits)
    if unknown:
        leaves = sorted({p.split(".")[-1] for p in available})
        raise BurnishError(
            f"target_modules: no linear layer named {', '.join(map(repr, unknown))} "
            f"in this model; its linear layers are: {', '.join(leaves)}"
        )
    return sorted(keys)


# Module-path words that mark attention and MLP (feed-forward) layers.
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "expert", "moe")


def module_kind(path: str) -> str | None:
    """"attention", "mlp" or None for a linear layer's (block-relative) path."""
    parts = path.lower().split(".")
    if any(w in p for p in parts for w in _ATTENTION_WORDS):
        return "attention"
    if any(w in p for p in parts for w in _MLP_WORDS):
        return "mlp"
    return None


def select_kinds(keys, attention: bool, mlp: bool) -> list[str]:
    """Keep the keys that `finetune_attention_modules` / `finetune_mlp_modules`
    choose; both True keeps every key (also layers that are neither)."""
    if attention and mlp:
        return list(keys)
    if not attention and not mlp:
        raise BurnishError("get_peft_model: finetune_attention_modules=False and "
                           "finetune_mlp_modules=False leave no layers to fine-tune")
    want = "attention" if attention else "mlp"
    chosen = [k for k in keys if module_kind(k) == want]
    if not chosen:
        raise BurnishError(f"get_peft_model: no {want} layers among the selected ones "
                           f"({', '.join(sorted(keys)) or 'none'})")
    return chosen


def _check_unsloth_args(kwargs: dict) -> bool | None:
    """Warn about no-op Unsloth arguments, reject unknown or meaningful ones."""
    unknown = sorted(set(kwargs) - set(UNSLOTH_ARGS))
    if unknown:
        raise TypeError(
            f"get_peft_model: unknown argument(s) {', '.join(unknown)}"
        )
    for name, value in sorted(kwargs.items()):
        allowed = UNSLOTH_ARGS[name]
        if allowed is not _ANY and value not in allowed:
            raise BurnishError(
                f"get_peft_model: {name}={value!r} is not supported by burnish "
                f"(only {', '.join(map(repr, allowed))}, which has no effect)"
            )
        warnings.warn(
            f"get_peft_model: argument '{name}' has no effect with burnish/MLX "
            "and is ignored",
            stacklevel=3,
        )


def _gradient_checkpointing_flag(value) -> bool:
    if value == "unsloth":
        warnings.warn(
            "get_peft_model: use_gradient_checkpointing='unsloth' (offloaded) "
            "means plain per-block gradient checkpointing in burnish",
            stacklevel=3,
        )
        return True
    if isinstance(value, bool):
        return value
    raise BurnishError(
        f"get_peft_model: use_gradient_checkpointing={value!r}: expected True, "
        "False or 'unsloth'"
    )


def get_peft_model(
    model,
    r: int = 16,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules="all-linear",
    use_rslora: bool = False,
    use_dora: bool = False,
    finetune_last_n_layers: int | None = None,
    use_gradient_checkpointing=False,
    random_state: int = 3407,
    finetune_vision_layers: bool = False,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
    **unsloth_args,
):
    """Add LoRA (or DoRA) adapters to `model` in place and return it.

    Every parameter except the adapters (`lora_a`, `lora_b` and DoRA's `m`)
    is frozen, norms and the output head included. Quantised linear layers
    get adapters too (QLoRA); their quantised weights stay frozen.

    Adapters go on the linear layers inside transformer blocks that
    `target_modules` names ("all-linear": all of them), restricted to
    attention layers (`finetune_mlp_modules=False`) or MLP layers
    (`finetune_attention_modules=False`). For a vision-language model they go
    on the language model's blocks (`finetune_language_layers`, default True)
    and, with `finetune_vision_layers=True`, on the vision tower's blocks;
    `finetune_last_n_layers` counts language blocks only.
    """
    _check_unsloth_args(unsloth_args)
    flags = {"finetune_vision_layers": finetune_vision_layers,
             "finetune_language_layers": finetune_language_layers,
             "finetune_attention_modules": finetune_attention_modules,
             "finetune_mlp_modules": finetune_mlp_modules}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise BurnishError(f"get_peft_model: {name}={value!r}: expected True or False")
    checkpointing = _gradient_checkpointing_flag(use_gradient_checkpointing)
    if peft_config(model) is not None:
        raise BurnishError("get_peft_model: this model already has adapters")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise BurnishError(f"get_peft_model: r={r!r}: expected a positive integer")
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise BurnishError(f"get_peft_model: lora_alpha={lora_alpha!r}: expected a positive number")
    if not 0.0 <= lora_dropout < 1.0:
        raise BurnishError(f"get_peft_model: lora_dropout={lora_dropout!r}: expected 0 <= p < 1")

    blocks = transformer_blocks(model)
    n = len(blocks) if finetune_last_n_layers is None else finetune_last_n_layers
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(blocks):
        raise BurnishError(
            f"get_peft_model: finetune_last_n_layers={finetune_last_n_layers!r}: "
            f"expected 1..{len(blocks)} (the model has {len(blocks)} blocks)"
        )
    from .vision import is_vlm

    if is_vlm(model):
        from .vision_train import vlm_lora_keys

        keys = vlm_lora_keys(model, n, target_modules, language=finetune_language_layers,
                             vision=finetune_vision_layers,
                             attention=finetune_attention_modules, mlp=finetune_mlp_modules)
        chosen = [(p, m) for p, m in model.named_modules() if p in keys]
    else:
        if finetune_vision_layers:
            raise BurnishError("get_peft_model: finetune_vision_layers=True, but this is a "
                               "text-only model (it has no vision layers)")
        if not finetune_language_layers:
            raise BurnishError("get_peft_model: finetune_language_layers=False leaves "
                               "nothing to fine-tune in a text-only model")
        _select_keys(blocks, target_modules)  # unknown names are an error anywhere
        keys = select_kinds(_select_keys(blocks[-n:], target_modules),
                            finetune_attention_modules, finetune_mlp_modules)
        chosen = [(p, m) for b in blocks[-n:] for p, m in b.named_modules() if p in keys]
    if use_dora:
        for path, module in chosen:
            if not isinstance(module, _LINEAR_TYPES):
                raise BurnishError(
                    f"get_peft_model: use_dora=True: {path} is a "
                    f"{type(module).__name__}; DoRA supports Linear layers only "
                    "(leave it out of target_modules)"
                )
    scale = lora_alpha / (math.sqrt(r) if use_rslora else r)

    from mlx_lm.tuner.utils import linear_to_lora_layers

    # (Full-path keys of a VLM match in linear_to_lora_layers' pass over the
    # whole model; block-relative ones in its pass over the last n blocks.)
    model.freeze()
    mx.random.seed(random_state)  # reproducible lora_a initialisation
    linear_to_lora_layers(
        model,
        n,
        {"rank": r, "scale": scale, "dropout": lora_dropout, "keys": keys},
        use_dora=use_dora,
    )
    # mlx-lm's layers are created unfrozen; keep only the adapter leaves trainable.
    model.freeze()
    model.unfreeze(keys=list(ADAPTER_LEAVES), strict=False)
    model._burnish_peft = PeftConfig(
        fine_tune_type="dora" if use_dora else "lora",
        r=r,
        lora_alpha=lora_alpha,
        scale=scale,
        dropout=lora_dropout,
        use_rslora=use_rslora,
        num_layers=n,
        keys=keys,
        target_modules=target_modules,
        gradient_checkpointing=checkpointing,
        **flags,
    )
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


# --- gradient checkpointing, per block instance ------------------------------

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    sub = _CHECKPOINTED.get(cls)
    if sub is not None:
        return sub

    def __call__(self, *args, **kwargs):
        if not self.training:  # inference: no recomputation, no overhead
            return cls.__call__(self, *args, **kwargs)

        def inner(params, *args, **kwargs):
            self.update(params)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    _CHECKPOINTED[cls] = sub
    return sub


def enable_gradient_checkpointing(model) -> list:
    """Checkpoint every transformer block of `model`; return the blocks changed."""
    changed = []
    for block in transformer_blocks(model):
        cls = type(block)
        if cls in _CHECKPOINTED.values():
            continue
        block.__class__ = _checkpointed_class(cls)
        changed.append(block)
    return changed


def disable_gradient_checkpointing(model, blocks=None) -> None:
    """Undo `enable_gradient_checkpointing` (on `blocks` only, when given).

    Only blocks whose class is still burnish's subclass are reset, so a class
    somebody else swapped in later is left alone.
    """
    for block in transformer_blocks(model) if blocks is None else blocks:
        base = type(block).__bases__[0] if type(block) in _CHECKPOINTED.values() else None
        if base is not None:
            block.__class__ = base


def is_gradient_checkpointed(block) -> bool:
    return type(block) in _CHECKPOINTED.values()
