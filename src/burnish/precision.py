"""Norm discovery, the training precision scope and architecture norm math.

In MLX a float32 norm weight turns a bf16 model's activations, KV cache and
logits into float32 (a bf16 `Linear` fed float32 returns float32). So:

* inference keeps the checkpoint dtypes; the few architectures whose reference
  implementation does norm *math* in float32 get that math per instance
  (`apply_architecture_norms`), computed from the stored low-precision weights
  and returned in the activation dtype;
* training wraps the model in `training_precision(model)`: norm parameters
  become float32, norm math runs in float32 and each norm returns the dtype of
  its input, so the rest of the network stays in bf16/fp16. Everything is
  undone exactly when the scope ends.

Per-instance behaviour works by assigning `module.__class__` to a subclass of
its own class (created once per class and cached). Shared classes such as
`nn.RMSNorm` are never modified, parameter paths do not change, and assigning
the recorded class back undoes it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------

_STANDARD_NORMS = (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm)

# Layers that carry a weight (and maybe a bias) but are never norms, whatever
# they are called.
_NOT_NORMS = tuple(
    getattr(nn, name)
    for name in ("Linear", "QuantizedLinear", "Embedding", "QuantizedEmbedding",
                 "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
                 "ConvTranspose2d", "ConvTranspose3d", "MultiHeadAttention")
    if hasattr(nn, name)
)

_SCALE_KEYS = {"weight", "scale", "gamma", "g"}
_BIAS_KEYS = {"bias", "beta", "b", "offset"}
_LN_ATTR = re.compile(r"^ln(_|\d|$)", re.IGNORECASE)  # ln, ln_f, ln_1, ln1


def _attr_name(name: str | None) -> str:
    """The attribute a module is stored under: last non-index part of a path."""
    if not name:
        return ""
    for part in reversed(name.split(".")):
        if not part.isdigit():
            return part
    return ""


def _says_norm(class_name: str, attr: str) -> bool:
    return ("norm" in class_name.lower() or "norm" in attr.lower()
            or bool(_LN_ATTR.match(attr)))


def _own_members(module: nn.Module):
    """Split a module's public members into own arrays and child modules.

    Returns None when it holds arrays inside lists/dicts (not norm-like).
    """
    arrays, children = {}, []
    for key, value in module.items():
        if key.startswith("_"):
            continue  # buffers, not parameters
        if isinstance(value, mx.array):
            arrays[key] = value
        elif isinstance(value, nn.Module):
            children.append((key, value))
        elif isinstance(value, (list, tuple, dict)):
            for sub_key, leaf in tree_flatten(value, prefix=key, is_leaf=nn.Module.is_module):
                if isinstance(leaf, nn.Module):
                    children.append((sub_key, leaf))
                elif isinstance(leaf, mx.array):
                    return None
    return arrays, children


def is_norm(module, name: str | None = None) -> bool:
    """Whether `module` is a normalisation layer. The one predicate burnish uses.

    True for instances of `nn.RMSNorm`, `nn.LayerNorm`, `nn.GroupNorm` and
    `nn.InstanceNorm`, and for custom modules that behave as a norm: the class
    name or the attribute name (`name`, a dotted path or attribute) says norm
    (`RMSNorm`, `LayerNormPerHead`, `q_norm`, `ln_f`, `input_layernorm`, ...),
    the module's own parameters are a scale and optionally a bias of the same
    shape, and any child module holding parameters is itself a norm (as in
    StableLM's `LayerNormPerHead`). A module that holds a `Linear` or other
    weighted layers is not a norm, whatever it is called.
    """
    if not isinstance(module, nn.Module) or isinstance(module, _NOT_NORMS):
        return False
    standard = isinstance(module, _STANDARD_NORMS)
    if not standard and not _says_norm(type(module).__name__, _attr_name(name)):
        return False  # cheap test first: most modules stop here
    members = _own_members(module)
    if members is None:
        return False
    arrays, children = members
    if not standard:
        if any(key not in _SCALE_KEYS | _BIAS_KEYS for key in arrays):
            return False
        scales = [v for k, v in arrays.items() if k in _SCALE_KEYS]
        biases = [v for k, v in arrays.items() if k in _BIAS_KEYS]
        if len(scales) > 1 or len(biases) > 1 or (biases and not scales):
            return False
        if scales and (scales[0].ndim > 2
                       or (biases and biases[0].shape != scales[0].shape)):
            return False  # an (out, in) weight with an (out,) bias is a projection
    norm_children = 0
    for key, child in children:
        if is_norm(child, key):
            norm_children += 1
        elif tree_flatten(child.parameters()):
            return False  # a "norm" that holds a Linear or other weights
    return standard or bool(scales) or norm_children > 0


def _path_key(path: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def find_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All norms of `model` as `(path, module)`, paths as in `named_modules()`.

    Only outermost norms are listed: the `LayerNorm`s inside a
    `LayerNormPerHead` belong to it (their parameters are its parameters).
    """
    norms = [(p, m) for p, m in model.named_modules() if is_norm(m, p)]
    paths = {p for p, _ in norms}

    def nested(path):
        parts = path.split(".")
        return any(".".join(parts[:i]) in paths for i in range(len(parts)))

    outer = [(p, m) for p, m in norms if not (p and nested(p))]
    return sorted(outer, key=lambda pm: _path_key(pm[0]))


def norm_parameter_paths(model: nn.Module) -> set[str]:
    """Dotted paths of every norm parameter ("model.norm.weight", ...).

    Paths match `tree_flatten(model.parameters())`; use them to exclude norms
    from weight decay or to freeze/unfreeze them.
    """
    out = set()
    for path, module in find_norms(model):
        for key, _ in tree_flatten(module.parameters()):
            out.add(f"{path}.{key}" if path else key)
    return out


# --------------------------------------------------------------------------
# Per-instance variant classes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    kind: str  # "arch" or "scope"
    base: type  # the class this variant subclasses
    key: object  # arch: the ArchNorm name; scope: cast_outputs


_VARIANTS: dict[type, _Layer] = {}  # every variant class burnish created
_CLASSES: dict[tuple, type] = {}  # (kind, base, key) -> variant class
_LIVE: dict[int, int] = {}  # id(module) -> number of open scopes on it


def _real_class(cls: type) -> type:
    """`cls` without burnish's variant layers on top."""
    while cls in _VARIANTS:
        cls = _VARIANTS[cls].base
    return cls


def _chain(cls: type):
    """A picklable description of `cls`: the real class and its layers."""
    layers = []
    while cls in _VARIANTS:
        layer = _VARIANTS[cls]
        layers.append((layer.kind, layer.key))
        cls = layer.base
    return cls, tuple(reversed(layers))


def _rebuild(real: type, layers: tuple):
    cls = real
    for kind, key in layers:
        cls = _BUILDERS[kind](cls, key)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # Dynamic classes cannot be pickled by name: pickle the real class and
    # the layers instead, and rebuild the same variant when unpickling.
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (_rebuild, _chain(type(self)), *rest)


def _make_variant(kind: str, base: type, key, call: Callable) -> type:
    cls = type(base.__name__, (base,), {
        "__call__": call,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": _reduce_ex,
    })
    _VARIANTS[cls] = _Layer(kind, base, key)
    _CLASSES[(kind, base, key)] = cls
    return cls


def _is_float(x) -> bool:
    return isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating)


def _to_f32(x):
    return x.astype(mx.float32) if _is_float(x) and x.dtype != mx.float32 else x


def _cast_out(y, dtype):
    if _is_float(y):
        return y if y.dtype == dtype else y.astype(dtype)
    if isinstance(y, (tuple, list)):
        return type(y)(_cast_out(v, dtype) for v in y)
    return y


def _activation_dtype(args, kwargs):
    for x in (*args, *kwargs.values()):
        if _is_float(x):
            return x.dtype
    return None


# --------------------------------------------------------------------------
# Architecture-specific float32 norm math (inference and training)
# --------------------------------------------------------------------------


def _f32(module, key):
    value = module.get(key)
    return None if value is None else value.astype(mx.float32)


def rms_norm_f32(module, x):
    """`nn.RMSNorm` in float32."""
    return mx.fast.rms_norm(x, _f32(module, "weight"), module.eps)


def gemma_rms_norm_f32(module, x):
    """Gemma's RMSNorm, `(1 + w)` scale, in float32 (as the reference does)."""
    return mx.fast.rms_norm(x, 1.0 + _f32(module, "weight"), module.eps)


def layer_norm_f32(module, x):
    """`nn.LayerNorm` in float32 (weight and bias optional)."""
    return mx.fast.layer_norm(x, _f32(module, "weight"), _f32(module, "bias"), module.eps)


@dataclass(frozen=True)
class ArchNorm:
    """A norm that needs float32 math for parity with its reference model.

    `norm_class` ("package.module.QualName") is the exact class of the norm.
    With `owner`, only norms stored under one of `attrs` in an instance of
    `owner` (or a subclass) match: vision towers use plain `nn.LayerNorm`
    whose precision depends on where they sit. `math(module, x)` receives a
    float32 input and returns float32; the norm returns the activation dtype.
    With `follow_cast_outputs`, inside `training_precision(cast_outputs=False)`
    it returns float32 like the other norms there.
    """

    name: str
    norm_class: str
    math: Callable[[nn.Module, mx.array], mx.array]
    owner: str | None = None
    attrs: tuple[str, ...] = ()
    follow_cast_outputs: bool = False


_ARCH_NORMS: dict[str, ArchNorm] = {}


def register_architecture_norm(spec: ArchNorm) -> None:
    """Add (or replace, by name) an architecture norm rule."""
    _ARCH_NORMS[spec.name] = spec


_LN = "mlx.nn.layers.normalization.LayerNorm"
for _spec in (
    ArchNorm("gemma3-text-rms", "mlx_lm.models.gemma3_text.RMSNorm", gemma_rms_norm_f32),
    ArchNorm("gemma3-vlm-text-rms", "mlx_vlm.models.gemma3.language.RMSNorm",
             gemma_rms_norm_f32),
    ArchNorm("gemma3-siglip-encoder-ln", _LN, layer_norm_f32,
             owner="mlx_vlm.models.gemma3.vision.EncoderLayer",
             attrs=("layer_norm1", "layer_norm2")),
    ArchNorm("gemma3-siglip-post-ln", _LN, layer_norm_f32,
             owner="mlx_vlm.models.gemma3.vision.SigLipVisionModel",
             attrs=("post_layernorm",)),
    ArchNorm("qwen3-vl-vision-block-ln", _LN, layer_norm_f32,
             owner="mlx_vlm.models.qwen3_vl.vision.Qwen3VLMoEVisionBlock",
             attrs=("norm1", "norm2"), follow_cast_outputs=True),
    ArchNorm("qwen3-vl-moe-vision-block-ln", _LN, layer_norm_f32,
             owner="mlx_vlm.models.qwen3_vl_moe.vision.Qwen3VLMoEVisionBlock",
             attrs=("norm1", "norm2"), follow_cast_outputs=True),
):
    register_architecture_norm(_spec)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _arch_class(base: type, name: str) -> type:
    found = _CLASSES.get(("arch", base, name))
    if found is not None:
        return found
    math = _ARCH_NORMS[name].math

    def __call__(self, x, *args, **kwargs):
        return math(self, _to_f32(x)).astype(x.dtype)

    return _make_variant("arch", base, name, __call__)


def _arch_spec(path: str, module: nn.Module, modules: dict) -> ArchNorm | None:
    real = _qualified(_real_class(type(module)))
    parts = path.split(".") if path else []
    # owner: the module that holds this one as attribute `attr` (maybe in a list)
    while parts and parts[-1].isdigit():
        parts.pop()
    attr = parts[-1] if parts else ""
    owner = modules.get(".".join(parts[:-1])) if parts else None
    owner_names = {_qualified(c) for c in type(owner).__mro__} if owner is not None else set()
    for spec in _ARCH_NORMS.values():
        if spec.norm_class != real:
            continue
        if spec.owner is None or (spec.owner in owner_names and attr in spec.attrs):
            return spec
    return None


def _arch_layer(cls: type) -> _Layer | None:
    while cls in _VARIANTS:
        if _VARIANTS[cls].kind == "arch":
            return _VARIANTS[cls]
        cls = _VARIANTS[cls].base
    return None


def apply_architecture_norms(model: nn.Module) -> nn.Module:
    """Give the norms that need it float32 math, per instance; idempotent.

    Called by the loader right after loading, for inference too. Weights stay
    in their stored dtype; the float32 copies exist only inside the norm's
    computation, and each norm returns the dtype of its input.
    """
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if _arch_layer(type(module)) is not None:
            continue
        spec = _arch_spec(path, module, modules)
        if spec is not None:
            module.__class__ = _arch_class(type(module), spec.name)
    return model


def architecture_norms(model: nn.Module) -> dict[str, str]:
    """Path -> rule name of every norm with architecture float32 math."""
    out = {}
    for path, module in model.named_modules():
        layer = _arch_layer(type(module))
        if layer is not None:
            out[path] = layer.key
    return out


# --------------------------------------------------------------------------
# The training precision scope
# --------------------------------------------------------------------------


def _scope_class(base: type, cast_outputs: bool) -> type:
    found = _CLASSES.get(("scope", base, cast_outputs))
    if found is not None:
        return found
    arch = _arch_layer(base)
    # Architecture norms always return the activation dtype unless their rule
    # says to follow cast_outputs.
    cast = cast_outputs or (arch is not None
                            and not _ARCH_NORMS[arch.key].follow_cast_outputs)

    def __call__(self, *args, **kwargs):
        inner = super(cls, self).__call__
        if type(self) is not cls and id(self) not in _LIVE:
            # Someone put their class on top of ours and the scope has ended:
            # our layer is inert, theirs keeps working.
            return inner(*args, **kwargs)
        dtype = _activation_dtype(args, kwargs)
        y = inner(*(_to_f32(a) for a in args), **{k: _to_f32(v) for k, v in kwargs.items()})
        return _cast_out(y, dtype) if cast and dtype is not None else y

    cls = _make_variant("scope", base, cast_outputs, __call__)
    return cls


_BUILDERS = {"arch": _arch_class, "scope": _scope_class}


# (id(holder module), key) -> dtypes on entry of each open scope, outermost first
_CHECKPOINT_DTYPES: dict[tuple[int, str], list] = {}


def checkpoint_dtypes(model: nn.Module) -> dict[str, mx.Dtype]:
    """Parameter path -> the dtype it has outside any `training_precision`.

    Inside a scope, norm parameters are float32; use this to save weights in
    the checkpoint's dtypes mid-training. Outside a scope it is the current
    dtype of every parameter.
    """
    out = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    if _CHECKPOINT_DTYPES:
        for path, module in model.named_modules():
            for key, value in module.items():
                dtypes = _CHECKPOINT_DTYPES.get((id(module), key))
                name = f"{path}.{key}" if path else key
                if dtypes and name in out:
                    out[name] = dtypes[0]
    return out


@dataclass
class _ParamRecord:
    holder: nn.Module  # the module whose dict holds the parameter
    key: str
    original: mx.array  # the checkpoint array, restored as is when unchanged
    promoted: mx.array  # the float32 copy put in its place


@dataclass
class _ClassRecord:
    module: nn.Module
    original: type  # class before the scope
    installed: type  # class the scope put there


def _param_holders(module: nn.Module):
    """(holder, key, array) for every floating parameter of `module`."""
    for sub in module.modules():
        for key, value in sub.items():
            if not key.startswith("_") and _is_float(value):
                yield sub, key, value


class _Scope:
    def __init__(self, model: nn.Module, cast_outputs: bool):
        self.model = model
        self.cast_outputs = cast_outputs
        self.params: list[_ParamRecord] = []
        self.classes: list[_ClassRecord] = []

    def enter(self):
        try:
            seen = set()
            for _, module in find_norms(self.model):
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self._promote(module)
                self._swap_class(module)
            mx.eval([r.promoted for r in self.params])
        except BaseException:
            self.exit()
            raise

    def _promote(self, module):
        for holder, key, value in _param_holders(module):
            if value.dtype == mx.float32:
                continue
            promoted = value.astype(mx.float32)
            self.params.append(_ParamRecord(holder, key, value, promoted))
            _CHECKPOINT_DTYPES.setdefault((id(holder), key), []).append(value.dtype)
            holder[key] = promoted

    def _swap_class(self, module):
        current = type(module)
        layer = _VARIANTS.get(current)
        # In a nested scope, replace the outer scope's layer rather than
        # stacking a second one on it.
        base = layer.base if layer is not None and layer.kind == "scope" else current
        installed = _scope_class(base, self.cast_outputs)
        module.__class__ = installed
        _LIVE[id(module)] = _LIVE.get(id(module), 0) + 1
        self.classes.append(_ClassRecord(module, current, installed))

    def exit(self):
        errors = []
        for record in reversed(self.classes):
            try:
                self._restore_class(record)
            except Exception as exc:  # keep undoing the rest
                errors.append(exc)
        restored = []
        for record in reversed(self.params):
            try:
                restored.append(self._restore_param(record))
            except Exception as exc:
                errors.append(exc)
        mx.eval([r for r in restored if r is not None])
        self.classes, self.params = [], []
        if errors:
            raise errors[0]

    @staticmethod
    def _restore_class(record: _ClassRecord):
        module = record.module
        count = _LIVE.get(id(module), 0) - 1
        if count > 0:
            _LIVE[id(module)] = count
        else:
            _LIVE.pop(id(module), None)
        # Only undo our own change: if another class was put there since,
        # it stays (our layer below it goes inert).
        if type(module) is record.installed:
            module.__class__ = record.original

    @staticmethod
    def _restore_param(record: _ParamRecord):
        dtypes = _CHECKPOINT_DTYPES.get((id(record.holder), record.key), [])
        if dtypes:
            dtypes.pop()
        if not dtypes:
            _CHECKPOINT_DTYPES.pop((id(record.holder), record.key), None)
        current = record.holder.get(record.key)
        if current is record.promoted:
            record.holder[record.key] = record.original
            return None
        if not isinstance(current, mx.array):
            return None  # removed or replaced by something else: not ours
        # Trained (or replaced): back to the checkpoint dtype. If that gives
        # the original values, keep the original array itself.
        value = current.astype(record.original.dtype)
        if value.shape == record.original.shape and mx.array_equal(
                value, record.original, equal_nan=True).item():
            value = record.original
        record.holder[record.key] = value
        return value


@contextmanager
def training_precision(model: nn.Module, cast_outputs: bool = True):
    """Train with float32 norms on this model instance; undone exactly on exit.

    Inside: every floating parameter of every norm (`find_norms`) is float32,
    norm math runs in float32, and with `cast_outputs` each norm returns the
    dtype of its input, so the rest of the network keeps its bf16/fp16 speed.
    Only this instance changes (its norms' classes are swapped to cached
    subclasses); parameter paths and saved files keep their names.

    On exit (normal, exception, or a failure during setup) classes come back
    as they were, norm parameters that were not changed come back as the
    original arrays, and trained ones are cast to the dtype they had on entry.
    Nested scopes are safe. Changes others made meanwhile (a class put on top
    of ours, new attributes) are left in place.
    """
    scope = _Scope(model, cast_outputs)
    scope.enter()
    try:
        yield model
    finally:
        scope.exit()
