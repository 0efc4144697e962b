"""Masked float32 cross-entropy, chunked over tokens, on tiny real models."""

import burnish  # noqa: F401  (BLAS routing before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.lora import LoRALinear

import tiny
from burnish import losses
from burnish.data import Batch


def reference(logits, targets, weights):
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    return (ce * weights).sum()


def random_case(shape=(2, 9), V=50, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    logits = (3 * mx.random.normal((*shape, V))).astype(dtype)
    targets = mx.random.randint(0, V, shape)
    weights = (mx.random.uniform(shape=shape) > 0.3).astype(mx.float32)
    return logits, targets, weights


def test_cross_entropy_matches_reference_value_and_gradient():
    logits, targets, weights = random_case()
    ours = losses.cross_entropy_sum(logits, targets, weights)
    ref = reference(logits, targets, weights)
    assert ours.dtype == mx.float32
    np.testing.assert_allclose(ours.item(), ref.item(), rtol=1e-6)
    g_ours = mx.grad(lambda x: losses.cross_entropy_sum(x, targets, weights))(logits)
    g_ref = mx.grad(lambda x: reference(x, targets, weights))(logits)
    np.testing.assert_allclose(np.array(g_ours), np.array(g_ref), atol=1e-6)


def test_bf16_logits_give_float32_loss_computed_in_float32():
    logits, targets, weights = random_case(dtype=mx.bfloat16)
    ours = losses.cross_entropy_sum(logits, targets, weights)
    assert ours.dtype == mx.float32
    # equal to the float32 computation on the same (bf16-valued) logits
    ref = reference(logits.astype(mx.float32), targets, weights)
    np.testing.assert_allclose(ours.item(), ref.item(), rtol=1e-6)
    # while a bf16 logsumexp is visibly off
    bf16 = ((mx.logsumexp(logits, axis=-1) - mx.take_along_axis(
        logits, targets[..., None], axis=-1)[..., 0]) * weights).sum()
    assert abs(bf16.item() - ref.item()) > 10 * abs(ours.item() - ref.item())
    g = mx.grad(lambda x: losses.cross_entropy_sum(x, targets, weights))(logits)
    assert g.dtype == mx.bfloat16


def test_zero_weights_remove_tokens():
    logits, targets, weights = random_case()
    base = losses.cross_entropy_sum(logits, targets, weights).item()
    off = weights == 0
    # change logits and targets where the weight is 0: the loss does not move
    logits2 = mx.where(off[..., None], logits + 5 * mx.random.normal(logits.shape), logits)
    targets2 = mx.where(off, (targets + 1) % logits.shape[-1], targets)
    assert losses.cross_entropy_sum(logits2, targets2, weights).item() == pytest.approx(base, rel=1e-6)
    g = mx.grad(lambda x: losses.cross_entropy_sum(x, targets, weights))(logits)
    assert mx.all(mx.where(off[..., None], g, 0) == 0).item()
    assert losses.cross_entropy_sum(logits, targets, mx.zeros_like(weights)).item() == 0.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("llama", "qwen3", "gemma3_text", "phi3", "stablelm", "olmo2"):
        path = tiny.build(tmp_path_factory.mktemp(kind), kind, dtype=mx.float32)
        out[kind] = load(str(path))[0]
    return out


def tokens(V, shape=(2, 40), seed=1):
    mx.random.seed(seed)
    return mx.random.randint(0, V, shape)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3_text", "phi3", "stablelm", "olmo2"])
def test_language_model_parts_equal_the_full_model(models, kind):
    model = models[kind]
    body, head = losses.language_model_parts(model)
    assert isinstance(head, losses._Head), "known model type fell back to the whole model"
    x = tokens(model.args.vocab_size)
    np.testing.assert_allclose(np.array(head(body(x))), np.array(model(x)), atol=1e-6)


def make_batch(model, seed=1):
    x = tokens(model.args.vocab_size, (2, 41), seed)
    mx.random.seed(seed)
    w = (mx.random.uniform(shape=(2, 40)) > 0.4).astype(mx.float32)
    return Batch(inputs=x[:, :-1], targets=x[:, 1:], weights=w, segments=None,
                 n_tokens=int(w.sum().item()))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # untied head / tied embeddings
def test_chunked_equals_unchunked_value_and_gradient(models, kind):
    model = models[kind]
    batch = make_batch(model)

    def run(chunk_size):
        fn = lambda m: losses.loss_and_count(m, batch, chunk_size=chunk_size)[0]
        loss, grads = nn.value_and_grad(model, fn)(model)
        return loss.item(), dict(tree_flatten(grads))

    whole, g_whole = run(0)
    ref = reference(model(batch.inputs), batch.targets, batch.weights).item()
    assert whole == pytest.approx(ref, rel=1e-6)
    for chunk in (7, 32, 1000):  # not dividing 80 tokens, dividing, one chunk
        value, g = run(chunk)
        assert value == pytest.approx(whole, rel=1e-6)
        assert g.keys() == g_whole.keys()
        for k in g_whole:
            np.testing.assert_allclose(np.array(g[k]), np.array(g_whole[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    # the head's own gradient is there (embed_tokens when tied, lm_head otherwise)
    head_key = "lm_head.weight" if kind == "llama" else "model.embed_tokens.weight"
    assert mx.abs(g_whole[head_key]).sum().item() > 0


def test_chunked_gradient_reaches_lora_parameters_of_the_head(models):
    model = models["llama"]
    model.freeze()
    original = model.lm_head
    model.lm_head = LoRALinear.from_base(original, r=4)
    model.lm_head.lora_b = 0.1 * mx.random.normal(model.lm_head.lora_b.shape)
    try:
        batch = make_batch(model, seed=2)
        grads = {}
        for chunk in (0, 16):
            fn = lambda m: losses.loss_and_count(m, batch, chunk_size=chunk)[0]
            grads[chunk] = dict(tree_flatten(nn.value_and_grad(model, fn)(model)[1]))
        assert set(grads[16]) == {"lm_head.lora_a", "lm_head.lora_b"}
        for k in grads[0]:
            assert mx.abs(grads[0][k]).sum().item() > 0
            np.testing.assert_allclose(np.array(grads[16][k]), np.array(grads[0][k]), rtol=1e-5, atol=1e-5)
    finally:
        model.lm_head = original
        model.unfreeze()


def test_chunked_without_gradient_work_gives_the_same_value(models):
    model = models["llama"]
    batch = make_batch(model)
    a = losses.loss_and_count(model, batch, chunk_size=0)[0].item()
    b = losses.loss_and_count(model, batch, chunk_size=9, training=False)[0].item()
    assert b == pytest.approx(a, rel=1e-6)


def test_loss_and_count_counts_trained_tokens_in_float32(models):
    model = models["olmo2"]
    batch = make_batch(model)
    loss, count = losses.loss_and_count(model, batch)
    assert loss.dtype == mx.float32 and count.dtype == mx.float32
    assert count.item() == batch.n_tokens


def test_bf16_model_loss_is_float32(tmp_path):
    model = load(str(tiny.build(tmp_path / "m", "llama", dtype=mx.bfloat16)))[0]
    batch = make_batch(model)
    for chunk in (0, 16):
        loss, grads = nn.value_and_grad(
            model, lambda m: losses.loss_and_count(m, batch, chunk_size=chunk)[0])(model)
        assert loss.dtype == mx.float32
        assert all(g.dtype == mx.bfloat16 for _, g in tree_flatten(grads))
    ref = reference(model(batch.inputs), batch.targets, batch.weights).item()
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_chunked_never_holds_full_float32_logits():
    # a head with a large vocabulary: full float32 logits are 2048 x 8000 x 4 = 65 MB
    mx.random.seed(0)
    V, N = 8000, 2048
    head = nn.Linear(64, V, bias=False)
    h = mx.random.normal((1, N, 64))
    t = mx.random.randint(0, V, (1, N))
    w = mx.ones((1, N))
    mx.eval(head.parameters(), h, t, w)

    def peak(fn):
        mx.eval(nn.value_and_grad(head, fn)(head))  # warm up allocator
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loss, grads = nn.value_and_grad(head, fn)(head)
        mx.eval(loss, grads)
        return mx.get_peak_memory() - base, loss.item()

    full, v_full = peak(lambda m: losses.cross_entropy_sum(m(h), t, w))
    chunked, v_chunked = peak(lambda m: losses.chunked_cross_entropy_sum(h, m, t, w, 32))
    assert v_chunked == pytest.approx(v_full, rel=1e-5)
    assert full > N * V * 4  # the whole float32 logits existed
    # MLX keeps ~10 operations in flight, so a few chunks coexist, not all 64
    assert chunked < 0.25 * N * V * 4


@pytest.mark.parametrize("chunk", [0, 8])
def test_head_on_trained_positions_only_equals_full(models, chunk):
    from burnish import data

    model = models["llama"]
    rng = np.random.default_rng(0)
    V = model.args.vocab_size
    examples = [data.Example(tokens=rng.integers(0, V, n).tolist(),
                             weights=[0] * (n // 2) + [1] * (n - n // 2)) for n in (30, 45, 12)]
    full = data.make_batch(examples, [0, 1, 2])
    gathered = data.make_batch(examples, [0, 1, 2], gather_multiple=16)
    assert gathered.index.shape[0] % 16 == 0 and gathered.index.shape[0] < full.inputs.size
    assert gathered.index.shape[0] >= full.n_tokens
    results = []
    for batch in (full, gathered):
        fn = lambda m: losses.loss_and_count(m, batch, chunk_size=chunk)[0]
        loss, grads = nn.value_and_grad(model, fn)(model)
        results.append((loss.item(), dict(tree_flatten(grads))))
    (a, ga), (b, gb) = results
    assert b == pytest.approx(a, rel=1e-6)
    for k in ga:
        np.testing.assert_allclose(np.array(gb[k]), np.array(ga[k]), rtol=1e-5, atol=1e-5, err_msg=k)
