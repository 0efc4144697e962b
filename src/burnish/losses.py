"""Masked cross-entropy in float32, whole or in chunks over the tokens.

Losses are *sums* over trained tokens, returned with the token count, so that
the trainer can divide by the count of the whole gradient-accumulation window
(a token-weighted mean, not a mean of per-batch means).

Memory: a (B, L, V) float32 copy of the logits is what usually dominates a
fine-tuning step for large vocabularies. `cross_entropy_sum` never keeps one
for the backward pass (its gradient is recomputed from the logits in their
own dtype), and `chunked_cross_entropy_sum` never builds full logits at all:
it runs the output head on `chunk_size` tokens at a time and recomputes each
chunk in the backward pass.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten



@mx.custom_function
def _token_ce(logits, targets):
    """Per-token cross-entropy in float32: logsumexp(x) - x[target]."""
    x = logits.astype(mx.float32)
    picked = mx.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(x, axis=-1) - picked


@_token_ce.vjp
def _token_ce_vjp(primals, cotangent, output):
    # d/dx = softmax(x) - onehot(target), recomputed from the logits so that
    # no float32 (.., V) array is kept between the forward and backward pass.
    logits, targets = primals
    x = logits.astype(mx.float32)
    idx = targets[..., None]
    lse = output + mx.take_along_axis(x, idx, axis=-1)[..., 0]
    onehot = mx.arange(x.shape[-1]) == idx
    g = (mx.exp(x - lse[..., None]) - onehot) * cotangent[..., None]
    return g.astype(logits.dtype), mx.zeros_like(targets)


def cross_entropy_sum(logits, targets, weights) -> mx.array:
    """Sum over tokens of weight * cross-entropy, as a float32 scalar.

    logits (..., V) in any float dtype; targets (...) int; weights (...) 0/1.
    """
    ce = _token_ce(logits, targets.astype(mx.int32))
    return (ce * weights.astype(mx.float32)).sum()


def _head_module(head):
    """The module whose parameters `head` uses (for explicit gradients)."""
    if isinstance(head, nn.Module):
        return head
    owner = getattr(head, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _chunks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def chunked_cross_entropy_sum(hidden, head, targets, weights, chunk_size=2048,
                              with_grad=True) -> mx.array:
    """`cross_entropy_sum(head(hidden), targets, weights)` without full logits.

    hidden (B, L, D) are the final hidden states; head maps them to logits.
    The head runs on `chunk_size` tokens at a time, one chunk after another
    (`mx.depends` chains them; MLX would otherwise run up to 20 independent
    chunks side by side), so at most about one chunk of logits exists at once.

    with_grad=True computes each chunk's gradients (for a unit cotangent)
    while its logits are alive and scales them in the backward pass: no
    recomputation, and gradients flow to `hidden` and to the head's trainable
    parameters. Use with_grad=False for evaluation (it skips that work; it
    is still differentiable, but then without the memory bound).
    """
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    t = targets.reshape(-1).astype(mx.int32)
    w = weights.reshape(-1).astype(mx.float32)
    pieces = _chunks(h.shape[0], chunk_size)
    if not with_grad:
        total = None
        for sl in pieces:
            hc = h[sl] if total is None else mx.depends(h[sl], total)
            part = cross_entropy_sum(head(hc), t[sl], w[sl])
            total = part if total is None else total + part
        return total
    module = _head_module(head)
    if module is None:
        module = _Identity()
    params = module.trainable_parameters()
    keys = [k for k, _ in tree_flatten(params)]
    loss, _, _ = _fused_ce(h, t, w, params, head, module, keys, pieces)
    return loss


def _fused_ce(h, t, w, params, head, module, keys, pieces):
    @mx.custom_function
    def fused(h, t, w, params):
        values = [v for _, v in tree_flatten(params)]

        def piece(tc, wc):
            def f(hc, *vals):
                module.update(tree_unflatten(list(zip(keys, vals))))
                return [cross_entropy_sum(head(hc), tc, wc)]
            return f

        total, dh, dp, one = None, [], None, mx.array(1.0, mx.float32)
        try:
            for sl in pieces:
                hc = h[sl]
                if total is not None:  # chunk i+1 starts after chunk i is done
                    hc = mx.depends(hc, [total, dh[-1]] + (dp or []))
                (part,), grads = mx.vjp(piece(t[sl], w[sl]), [hc, *values], [one])
                total = part if total is None else total + part
                dh.append(grads[0])
                g = grads[1:]
                dp = g if dp is None else [a + b for a, b in zip(dp, g)]
        finally:
            module.update(params)
        return total, mx.concatenate(dh, axis=0), tree_unflatten(list(zip(keys, dp))) if keys else {}

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        _, t, w, _ = primals
        c = cotangents[0]
        _, dh, dp = outputs
        scale = lambda g: (g.astype(mx.float32) * c).astype(g.dtype)
        return scale(dh), mx.zeros_like(t), mx.zeros_like(w), tree_map(scale, dp)

    return fused(h, t, w, params)


class _Head(nn.Module):
    """Output head of an mlx-lm model: lm_head or tied embeddings, plus
    the model's final logit transform (softcapping or scaling)."""

    def __init__(self, proj, tied, softcap=None, scale=None):
        super().__init__()
        self.proj = proj
        self._tied = tied
        self._softcap = softcap
        self._scale = scale

    def __call__(self, h):
        out = self.proj.as_linear(h) if self._tied else self.proj(h)
        if self._softcap is not None:
            out = mx.tanh(out / self._softcap) * self._softcap
        if self._scale is not None:
            out = out * self._scale
        return out


class _Identity(nn.Module):
    def __call__(self, x):
        return x


# mlx-lm model types whose Model.__call__ is exactly
# `head(self.model(inputs, cache))` with head = lm_head or tied embed_tokens.
_PLAIN = {
    "afm7", "afmoe", "apertus", "bailing_moe", "bitnet", "cohere2", "deepseek",
    "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5", "ernie4_5_moe", "exaone4",
    "gemma3_text", "glm", "glm4", "glm4_moe", "helium", "hunyuan_v1_dense",
    "internlm2", "internlm3", "llama", "mellum", "mimo", "ministral3", "mistral",
    "nanbeige", "nemotron", "olmo2", "olmo3", "olmoe", "phi", "phi3", "phimoe",
    "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm", "starcoder2", "step3p5",
    "youtu_llm",
}


def _model_type(model):
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)


def language_model_parts(model):
    """(body, head): body(inputs, cache) -> final hidden states, head(h) -> logits.

    For known mlx-lm model types `head(body(x, cache)) == model(x, cache=cache)`;
    for anything else body is the whole model and head the identity.
    """
    kind = _model_type(model)
    inner = getattr(model, "model", None)
    head = None
    if isinstance(inner, nn.Module) and kind in _PLAIN | {"gemma2", "granite", "granitemoe", "cohere"}:
        if "lm_head" in model and kind not in ("gemma2", "cohere"):
            proj, tied = model.lm_head, False
        elif "embed_tokens" in inner:
            proj, tied = inner.embed_tokens, True
        else:
            proj = None
        if proj is not None:
            softcap = getattr(model, "final_logit_softcapping", None) if kind == "gemma2" else None
            scale = None
            if kind in ("granite", "granitemoe"):
                scale = 1.0 / model.logits_scaling
            elif kind == "cohere":
                scale = model.model.args.logit_scale
            head = _Head(proj, tied, softcap=softcap, scale=scale)
    if head is None:
        return (lambda inputs, cache=None: model(inputs, cache=cache)), _Identity()
    return (lambda inputs, cache=None: inner(inputs, cache)), head


def loss_and_count(model, batch, chunk_size=None, training=True):
    """(sum of weighted CE in float32, number of trained tokens as float32).

    chunk_size: tokens per head chunk; None chunks when the float32 logits
    would exceed 2**20 elements (4 MB), in chunks of about 2**19 elements
    (at least 128 tokens); 0 never chunks. The float32 copies of the logits
    and their gradient are what dominate a step's peak memory otherwise
    (measured: an 11M-parameter model, vocab 16384, 1408-token batch: peak
    342 -> 215 MB, same speed). Packed batches (segments not None) run with
    block-diagonal masks; with `batch.index` the head runs only on the
    listed (trained) positions. training=False skips the fused gradient work of
    the chunked path (for evaluation).
    """
    from .data import packed_caches

    body, head = language_model_parts(model)
    cache = None
    if batch.segments is not None:
        cache = packed_caches(model, batch.segments)
    hidden = body(batch.inputs, cache)
    count = batch.weights.astype(mx.float32).sum()
    targets, weights = batch.targets, batch.weights
    index = getattr(batch, "index", None)
    if index is not None:  # the head only where something is trained
        hidden = hidden.reshape(-1, hidden.shape[-1])[index]
        targets, weights = targets.reshape(-1)[index], weights.reshape(-1)[index]
    if chunk_size is None:
        V = _vocab_size(model, head)
        n = targets.size
        chunk_size = max(128, (2**19) // V) if V and n * V > 2**20 else 0
    if chunk_size:
        loss = chunked_cross_entropy_sum(hidden, head, targets, weights,
                                         chunk_size, with_grad=training)
    else:
        loss = cross_entropy_sum(head(hidden), targets, weights)
    return loss, count


def _vocab_size(model, head):
    if isinstance(head, _Head):
        w = head.proj.weight
        return w.shape[0]
    args = getattr(model, "args", None)
    return getattr(args, "vocab_size", None)
