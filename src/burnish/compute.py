"""Compute dtype for training: run a bf16/fp16 model's training in float32.

On the Linux CPU build, bf16/fp16 matmuls are emulated (no BLAS) while
float32 matmuls go to OpenBLAS (see `backend`): a LoRA step of a bf16 model
runs several times faster in float32 (measured: an 11M-parameter Llama,
1408-token batch, 27 s -> 4.5 s on 2 cores), so "auto", the Trainer's
default, picks float32 there and the model's dtypes on every GPU. It casts the
model's floating parameters to float32 for the duration of training and casts
each one back to its own dtype when training ends, also on errors, so that
saved adapters and merged weights keep the checkpoint's dtypes. Quantised
weights stay quantised (their float scales and biases are cast).

Memory: float32 weights take twice the bytes of bf16 ones; activations are
float32 too. With the chunked loss the step's peak stayed below stock
mlx-lm's bf16 step in the training benchmark; check on your model.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import BurnishError

CHOICES = (None, "auto", "float32")
_LOW = (mx.bfloat16, mx.float16)


def resolve_compute_dtype(setting) -> mx.Dtype | None:
    """None: keep the model's dtypes. "float32": train in float32.
    "auto": float32 on a CPU device with an optimised BLAS routed, else None."""
    if setting not in CHOICES:
        raise BurnishError(f"compute_dtype={setting!r}: expected one of None, 'auto', 'float32'")
    if setting == "float32":
        return mx.float32
    if setting == "auto":
        from .backend import BLAS

        if mx.default_device() == mx.cpu and BLAS.status == "routed":
            return mx.float32
    return None


@contextmanager
def compute_dtype(model: nn.Module, dtype: mx.Dtype | None):
    """Cast `model`'s bf16/fp16 parameters to `dtype` inside the block.

    On exit each cast parameter goes back to its own dtype (trained values
    rounded once, as float32 master weights are). Yields the number of cast
    parameters.
    """
    if dtype is None:
        yield 0
        return
    original = {k: v.dtype for k, v in tree_flatten(model.parameters()) if v.dtype in _LOW}
    try:
        if original:
            model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in
                                         tree_flatten(model.parameters()) if k in original]))
            mx.eval(model.parameters())
        yield len(original)
    finally:
        if original:
            model.update(tree_unflatten([(k, v.astype(original[k])) for k, v in
                                         tree_flatten(model.parameters()) if k in original]))
            mx.eval(model.parameters())
