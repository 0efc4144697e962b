"""The precision scope: norm discovery, float32 norms in training, checkpoint
dtypes at inference, exact undo, isolation, architecture norm math."""

import pickle

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.models import gemma3_text

from burnish import precision as P
from burnish.loading import from_pretrained

PROMPT = mx.array([[1, 5, 17, 42, 99, 7, 3, 250, 12, 40]])
TYPES = ["llama", "qwen3", "gemma3_text", "stablelm"]


# ---------------------------------------------------------------- helpers


def params(model):
    return dict(tree_flatten(model.parameters()))


def snapshot(model):
    """Everything the scope must give back: classes and parameter objects."""
    return ({p: type(m) for p, m in model.named_modules()}, params(model))


def assert_restored(model, snap):
    classes, before = snap
    assert {p: type(m) for p, m in model.named_modules()} == classes
    after = params(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert after[k] is v or mx.array_equal(after[k], v).item(), k


def norm_io(model, x):
    """Run model(x); return {norm path: (input dtype, output dtype)}.

    Records through a test-local subclass per instance, removed afterwards.
    """
    seen, swapped = {}, []
    for path, module in P.find_norms(model):
        cls = type(module)

        def call(self, *args, _cls=cls, _path=path, **kwargs):
            y = _cls.__call__(self, *args, **kwargs)
            seen[_path] = (args[0].dtype, y.dtype)
            return y

        module.__class__ = type(cls.__name__, (cls,), {"__call__": call})
        swapped.append((module, cls))
    try:
        out = model(x)
        mx.eval(out)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
    return seen, out


def expected_norm_params(model):
    return {k for k in params(model) if "norm" in k}


class UserNorm(nn.Module):
    """A user-defined norm: scale and bias, custom math."""

    def __init__(self, dims):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) * mx.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) \
            * self.weight + self.bias


class NormProjection(nn.Module):
    """Says norm, is not one: it holds a Linear."""

    def __init__(self, dims):
        super().__init__()
        self.proj = nn.Linear(dims, dims)

    def __call__(self, x):
        return self.proj(x)


class Affine(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        return x * self.weight + self.bias


class Toy(nn.Module):
    def __init__(self, dims=16, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, dims)
        self.user_norm = UserNorm(dims)
        self.norm_proj = NormProjection(dims)
        self.ln_f = Affine(dims)  # a norm by its attribute name
        self.shift = Affine(dims)  # the same class under another name: not a norm
        self.head = nn.Linear(dims, vocab, bias=False)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = self.norm_proj(self.user_norm(h))
        return self.head(self.ln_f(self.shift(h)))


def _noisy(tree):
    from mlx.utils import tree_map
    return tree_map(lambda v: v + 0.1 * mx.random.normal(v.shape), tree)


def toy(dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    model = Toy()
    model.update(_noisy(model.parameters()))
    model.set_dtype(dtype)
    return model


# ---------------------------------------------------------------- discovery


@pytest.mark.parametrize("model_type", TYPES + ["olmo2", "phi3"])
def test_discovery_on_real_architectures(model_factory, model_type):
    model, _ = mlx_load(str(model_factory(model_type)))
    norms = dict(P.find_norms(model))
    assert P.norm_parameter_paths(model) == expected_norm_params(model)
    names = set(norms)
    if model_type in ("qwen3", "olmo2", "gemma3_text"):
        assert "model.layers.0.self_attn.q_norm" in names
        assert "model.layers.1.self_attn.k_norm" in names
    if model_type == "stablelm":
        per_head = norms["model.layers.0.self_attn.q_layernorm"]
        assert type(per_head).__name__ == "LayerNormPerHead"
        # its LayerNorms belong to it and are not listed on their own
        assert not any(".norms." in n for n in names)
        assert "model.layers.0.self_attn.q_layernorm.norms.0.weight" in \
            P.norm_parameter_paths(model)
    if model_type == "gemma3_text":
        assert all(isinstance(m, gemma3_text.RMSNorm) for m in norms.values())
    assert not any("proj" in n or "mlp" in n for n in names)


def test_discovery_user_norm_and_false_friends():
    model = toy()
    assert [p for p, _ in P.find_norms(model)] == ["ln_f", "user_norm"]
    assert P.norm_parameter_paths(model) == {"ln_f.weight", "ln_f.bias",
                                             "user_norm.weight", "user_norm.bias"}
    assert not P.is_norm(model.norm_proj, "norm_proj")
    assert not P.is_norm(model.shift, "shift")
    assert P.is_norm(model.shift, "model.layers.3.ln_2")
    assert not P.is_norm(nn.Linear(4, 4), "norm")
    assert not P.is_norm(nn.Embedding(4, 4), "layernorm")
    assert P.is_norm(nn.RMSNorm(4))
    assert P.is_norm(nn.GroupNorm(2, 4), "anything")
    assert P.is_norm(nn.InstanceNorm(4))


def test_is_norm_rejects_non_norm_shapes():
    class ProjNorm(nn.Module):  # (out, in) weight and (out,) bias: a projection
        def __init__(self):
            super().__init__()
            self.weight = mx.zeros((8, 4))
            self.bias = mx.zeros((8,))

    class GateNorm(nn.Module):  # an extra parameter besides scale and bias
        def __init__(self):
            super().__init__()
            self.weight = mx.ones((4,))
            self.alpha = mx.ones((4,))

    class EmptyNorm(nn.Module):  # nothing to scale
        pass

    class Norm2D(nn.Module):  # Cohere's LayerNorm2D style: a 2-D scale
        def __init__(self):
            super().__init__()
            self.weight = mx.ones((2, 4))

    class GatedRMSNorm(nn.RMSNorm):  # a standard norm class that also holds a Linear
        def __init__(self):
            super().__init__(4)
            self.gate = nn.Linear(4, 4)

    assert not P.is_norm(GatedRMSNorm())
    assert not P.is_norm(ProjNorm())
    assert not P.is_norm(GateNorm())
    assert not P.is_norm(EmptyNorm())
    assert P.is_norm(Norm2D())
    assert not P.is_norm("norm")


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("model_type", TYPES)
def test_inference_load_keeps_checkpoint_dtypes(model_factory, model_type):
    model, _ = from_pretrained(model_factory(model_type))
    assert {v.dtype for v in params(model).values()} == {mx.bfloat16}
    io, logits = norm_io(model, PROMPT)
    assert io and set(io) == {p for p, _ in P.find_norms(model)}
    assert all(i == o == mx.bfloat16 for i, o in io.values()), io
    assert logits.dtype == mx.bfloat16
    if model_type == "gemma3_text":
        assert set(P.architecture_norms(model)) == set(io)
    else:
        assert P.architecture_norms(model) == {}


def test_apply_architecture_norms_is_idempotent(model_factory):
    model, _ = mlx_load(str(model_factory("gemma3_text")))
    P.apply_architecture_norms(model)
    classes = {p: type(m) for p, m in model.named_modules()}
    first = model(PROMPT)
    P.apply_architecture_norms(model)
    assert {p: type(m) for p, m in model.named_modules()} == classes
    assert mx.array_equal(model(PROMPT), first).item()
    norm = model.model.norm
    assert type(norm).__mro__[1] is gemma3_text.RMSNorm  # one layer, not two


def test_gemma3_float32_norm_math_is_closer_to_float32(model_factory):
    path = model_factory("gemma3_text")
    stock, _ = mlx_load(str(path))
    ours, _ = from_pretrained(path)
    ref, _ = mlx_load(str(path))
    ref.set_dtype(mx.float32)
    tokens = mx.random.randint(0, 300, (2, 24), key=mx.random.key(1))
    target = ref(tokens)

    def error(model):
        return mx.abs(model(tokens).astype(mx.float32) - target).mean().item()

    e_stock, e_ours = error(stock), error(ours)
    assert e_ours < 0.9 * e_stock, (e_ours, e_stock)
    # the training scope computes the same thing from float32 copies
    with P.training_precision(ours):
        assert error(ours) < 0.9 * e_stock


# ---------------------------------------------------------------- the scope


@pytest.mark.parametrize("model_type", TYPES)
def test_scope_promotes_norms_and_keeps_activations(model_factory, model_type):
    model, _ = from_pretrained(model_factory(model_type))
    snap = snapshot(model)
    before = snap[1]
    norm_keys = P.norm_parameter_paths(model)
    with P.training_precision(model) as m:
        assert m is model
        inside = params(model)
        assert inside.keys() == before.keys()
        for k, v in inside.items():
            if k in norm_keys:
                assert v.dtype == mx.float32, k
                assert mx.array_equal(v, before[k].astype(mx.float32)).item()
            else:
                assert v is before[k], k
        io, logits = norm_io(model, PROMPT)
        assert set(io) == {p for p, _ in P.find_norms(model)}
        assert all(i == o == mx.bfloat16 for i, o in io.values()), io
        assert logits.dtype == mx.bfloat16
    assert_restored(model, snap)
    # untouched norm parameters come back as the very same arrays
    assert all(params(model)[k] is before[k] for k in before)


def test_scope_without_cast_outputs(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    with P.training_precision(model, cast_outputs=False):
        io, logits = norm_io(model, PROMPT)
        assert all(o == mx.float32 for _, o in io.values())
        assert logits.dtype == mx.float32


def test_exit_on_exception_restores_and_reraises(model_factory):
    model, _ = from_pretrained(model_factory("qwen3"))
    snap = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with P.training_precision(model):
            model(PROMPT)
            1 / 0
    assert_restored(model, snap)
    assert all(params(model)[k] is v for k, v in snap[1].items())


@pytest.mark.parametrize("step", ["_swap_class", "_promote"])
def test_failure_halfway_through_setup_is_undone(model_factory, monkeypatch, step):
    model, _ = from_pretrained(model_factory("gemma3_text"))
    snap = snapshot(model)
    logits = model(PROMPT)
    real = getattr(P._Scope, step)
    calls = []

    def flaky(self, module):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(self, module)

    monkeypatch.setattr(P._Scope, step, flaky)
    with pytest.raises(RuntimeError, match="injected"):
        with P.training_precision(model):
            pytest.fail("body must not run")
    assert len(calls) == 3
    assert_restored(model, snap)
    assert all(params(model)[k] is v for k, v in snap[1].items())
    assert P._LIVE == {} and P._CHECKPOINT_DTYPES == {}
    assert mx.array_equal(model(PROMPT), logits).item()


def test_trained_norms_come_back_in_checkpoint_dtype(model_factory):
    model, _ = from_pretrained(model_factory("llama"), full_finetuning=True)
    snap = snapshot(model)
    before = snap[1]
    norm_keys = P.norm_parameter_paths(model)
    tokens, targets = PROMPT[:, :-1], PROMPT[:, 1:]

    def loss_fn(m):
        return nn.losses.cross_entropy(m(tokens).astype(mx.float32), targets).mean()

    opt = optim.Adam(learning_rate=1e-2)
    with P.training_precision(model):
        step = nn.value_and_grad(model, loss_fn)
        for _ in range(2):
            loss, grads = step(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
        assert mx.isfinite(loss).item()
        trained = params(model)
        assert all(trained[k].dtype == mx.float32 for k in norm_keys)
        assert all(trained[k].dtype == mx.bfloat16 for k in trained if k not in norm_keys)
    after = params(model)
    assert {p: type(m) for p, m in model.named_modules()} == snap[0]
    for k in norm_keys:
        assert after[k].dtype == mx.bfloat16
        assert mx.array_equal(after[k], trained[k].astype(mx.bfloat16)).item()
    assert any(not mx.array_equal(after[k], before[k]).item() for k in norm_keys)


def test_unchanged_values_come_back_as_original_arrays(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    before = params(model)
    norm = model.model.norm
    with P.training_precision(model):
        # replaced by an equal array (an optimizer step with zero gradient)
        norm.weight = norm.weight * 1.0
        # changed by less than bf16 can represent
        layer_norm = model.model.layers[0].input_layernorm
        layer_norm.weight = layer_norm.weight * (1 + 2**-12)
        # really trained
        post = model.model.layers[1].post_attention_layernorm
        post.weight = post.weight + 0.5
        target = post.weight.astype(mx.bfloat16)
    assert model.model.norm.weight is before["model.norm.weight"]
    assert model.model.layers[1].post_attention_layernorm.weight.dtype == mx.bfloat16
    assert mx.array_equal(model.model.layers[1].post_attention_layernorm.weight, target).item()


def test_nested_and_repeated_scopes(model_factory):
    model, _ = from_pretrained(model_factory("gemma3_text"))
    snap = snapshot(model)
    arch_classes = {p: type(m) for p, m in P.find_norms(model)}
    dtypes = {k: v.dtype for k, v in snap[1].items()}
    assert P.checkpoint_dtypes(model) == dtypes
    with P.training_precision(model):
        outer_classes = {p: type(m) for p, m in P.find_norms(model)}
        assert P.checkpoint_dtypes(model) == dtypes
        with P.training_precision(model):
            assert P.checkpoint_dtypes(model) == dtypes
            assert {p: type(m) for p, m in P.find_norms(model)} == outer_classes
            assert {v.dtype for k, v in params(model).items() if "norm" in k} == {mx.float32}
        with P.training_precision(model, cast_outputs=False):
            io, _ = norm_io(model, PROMPT)
            # Gemma 3 norms always return the activation dtype
            assert all(o == mx.bfloat16 for _, o in io.values())
        assert {p: type(m) for p, m in P.find_norms(model)} == outer_classes
        assert {v.dtype for k, v in params(model).items() if "norm" in k} == {mx.float32}
        io, logits = norm_io(model, PROMPT)
        assert logits.dtype == mx.bfloat16
    assert_restored(model, snap)
    assert P._CHECKPOINT_DTYPES == {} and P._LIVE == {}
    assert {p: type(m) for p, m in P.find_norms(model)} == arch_classes
    for _ in range(3):  # repeated scopes reuse the cached classes
        with P.training_precision(model):
            assert {p: type(m) for p, m in P.find_norms(model)} == outer_classes
    assert_restored(model, snap)


def test_scope_composes_with_architecture_norms(model_factory):
    model, _ = from_pretrained(model_factory("gemma3_text"))
    norm = model.model.norm
    arch_cls = type(norm)
    assert P.architecture_norms(model)["model.norm"] == "gemma3-text-rms"
    with P.training_precision(model):
        assert type(norm).__mro__[1] is arch_cls
        assert P.architecture_norms(model)["model.norm"] == "gemma3-text-rms"
    assert type(norm) is arch_cls


def test_isolation_between_two_models(model_factory):
    path = model_factory("llama")
    a, _ = from_pretrained(path)
    b, _ = from_pretrained(path)
    b_snap = snapshot(b)
    b_logits = b(PROMPT)
    with P.training_precision(a):
        assert all(type(m) is nn.RMSNorm for _, m in P.find_norms(b))
        assert_restored(b, b_snap)
        io, logits = norm_io(b, PROMPT)
        assert all(i == o == mx.bfloat16 for i, o in io.values())
        assert mx.array_equal(logits, b_logits).item()
        assert type(a.model.norm) is not nn.RMSNorm
        assert nn.RMSNorm.__call__ is nn.RMSNorm.__dict__["__call__"]
    assert all(type(m) is nn.RMSNorm for _, m in P.find_norms(a))


def test_other_peoples_patches_survive_exit(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    x = mx.random.normal((1, 3, 64)).astype(mx.bfloat16)
    patched = model.model.layers[0].input_layernorm
    tagged = model.model.norm
    y_before = patched(x)
    calls = []
    with P.training_precision(model):
        cls = type(patched)

        class Theirs(cls):  # someone else's per-instance patch, on top of ours
            def __call__(self, x):
                calls.append(1)
                return super().__call__(x)

        patched.__class__ = Theirs
        tagged.owner_note = "mine"
        tagged.extra_scale = mx.array([2.0])
    assert type(patched) is Theirs
    assert tagged.owner_note == "mine" and "extra_scale" in tagged
    assert type(tagged) is nn.RMSNorm
    assert patched.weight.dtype == mx.bfloat16
    # burnish's layer under theirs is inert: the original math and dtype
    y = patched(x)
    assert calls and y.dtype == mx.bfloat16
    assert mx.array_equal(y, y_before).item()


# ---------------------------------------------------------------- plumbing


def test_swapped_classes_keep_repr_paths_saving_compile_pickle(model_factory, tmp_path):
    # (stock load: a model from from_pretrained carries unpicklable load info)
    model, _ = mlx_load(str(model_factory("gemma3_text")))
    P.apply_architecture_norms(model)
    model.freeze()
    model.model.norm.unfreeze()
    text, keys = repr(model), list(params(model))
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable == ["model.norm.weight"]
    model.save_weights(str(tmp_path / "before.safetensors"))
    with P.training_precision(model):
        assert repr(model) == text
        assert list(params(model)) == keys
        assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable
        model.save_weights(str(tmp_path / "inside.safetensors"))
        eager = model(PROMPT)
        compiled = mx.compile(lambda t: model(t))(PROMPT)
        assert mx.allclose(compiled.astype(mx.float32), eager.astype(mx.float32),
                           atol=1e-2).item()
        copy = pickle.loads(pickle.dumps(model))
        assert type(copy.model.norm) is type(model.model.norm)
        assert mx.array_equal(copy(PROMPT), eager).item()
    assert set(mx.load(str(tmp_path / "inside.safetensors"))) == \
        set(mx.load(str(tmp_path / "before.safetensors")))
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy.model.norm) is type(model.model.norm)
    assert mx.array_equal(copy(PROMPT), model(PROMPT)).item()


def test_scope_on_user_model(model_factory):
    model = toy()
    snap = snapshot(model)
    tokens = mx.array([[1, 2, 3]])
    with P.training_precision(model):
        assert model.user_norm.weight.dtype == mx.float32
        assert model.ln_f.bias.dtype == mx.float32
        assert model.norm_proj.proj.weight.dtype == mx.bfloat16
        assert model.shift.weight.dtype == mx.bfloat16
        io, logits = norm_io(model, tokens)
        assert set(io) == {"user_norm", "ln_f"}
        assert all(o == mx.bfloat16 for _, o in io.values())
        assert logits.dtype == mx.bfloat16
    assert_restored(model, snap)


# ---------------------------------------------------------------- vision towers


def test_vision_tower_norms():
    from mlx_vlm.models.gemma3.config import VisionConfig as GemmaVisionConfig
    from mlx_vlm.models.gemma3.vision import VisionModel as GemmaVision
    from mlx_vlm.models.qwen3_vl.config import VisionConfig as QwenVisionConfig
    from mlx_vlm.models.qwen3_vl.vision import VisionModel as QwenVision

    mx.random.seed(0)
    gemma = GemmaVision(GemmaVisionConfig(
        model_type="gemma3", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        num_attention_heads=2, patch_size=14, image_size=28))
    qwen = QwenVision(QwenVisionConfig(
        depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=48, num_heads=2,
        patch_size=14, num_position_embeddings=16, deepstack_visual_indexes=[1]))
    for tower in (gemma, qwen):
        tower.update(_noisy(tower.parameters()))
        tower.set_dtype(mx.bfloat16)
        P.apply_architecture_norms(tower)

    g = P.architecture_norms(gemma)
    assert set(g) == {"vision_model.post_layernorm",
                      *(f"vision_model.encoder.layers.{i}.layer_norm{j}"
                        for i in range(2) for j in (1, 2))}
    q = P.architecture_norms(qwen)
    assert set(q) == {f"blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)}
    assert {p for p, _ in P.find_norms(qwen)} - set(q) == \
        {"merger.norm", "deepstack_merger_list.0.norm"}
    assert {v.dtype for v in params(qwen).values()} == {mx.bfloat16}

    image = mx.random.normal((1, 28, 28, 3)).astype(mx.bfloat16)
    assert gemma(image)[0].dtype == mx.bfloat16

    x = mx.random.normal((5, 32)).astype(mx.bfloat16)
    block_norm = qwen.blocks[0].norm1
    siglip_norm = gemma.vision_model.encoder.layers[0].layer_norm1
    ref = nn.LayerNorm(32, eps=1e-6)
    ref.update({k: v.astype(mx.float32) for k, v in block_norm.items()
                if isinstance(v, mx.array)})
    y = block_norm(x)
    assert y.dtype == mx.bfloat16
    assert mx.array_equal(y, ref(x.astype(mx.float32)).astype(mx.bfloat16)).item()
    with P.training_precision(qwen, cast_outputs=False), \
            P.training_precision(gemma, cast_outputs=False):
        assert block_norm(x).dtype == mx.float32  # Qwen3-VL follows cast_outputs
        assert siglip_norm(x).dtype == mx.bfloat16  # SigLIP: activation dtype
        assert qwen.merger.norm(x).dtype == mx.float32
    with P.training_precision(qwen):
        assert block_norm(x).dtype == mx.bfloat16
        assert qwen.merger.norm(x).dtype == mx.bfloat16
    assert type(block_norm).__mro__[1] is nn.LayerNorm
    assert type(qwen.merger.norm) is nn.LayerNorm


# ---------------------------------------------------------------- property test


def _norm_of(kind, dims):
    if kind == "rms":
        return nn.RMSNorm(dims)
    if kind == "layer":
        return nn.LayerNorm(dims)
    if kind == "layer-nobias":
        return nn.LayerNorm(dims, bias=False)
    if kind == "group":
        return nn.GroupNorm(2, dims)
    if kind == "gemma":
        return gemma3_text.RMSNorm(dims)
    return UserNorm(dims)


TOL = {mx.bfloat16: 2**-7, mx.float16: 2**-9, mx.float32: 1e-5}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["rms", "layer", "layer-nobias", "group", "gemma", "user"]),
       dtype=st.sampled_from([mx.bfloat16, mx.float16, mx.float32]),
       batch=st.integers(1, 3), length=st.integers(1, 9),
       dims=st.sampled_from([4, 8, 16, 64]), seed=st.integers(0, 2**16),
       how=st.sampled_from(["scope", "arch", "arch+scope"]))
def test_norm_variants_keep_dtype_and_match_float32(kind, dtype, batch, length, dims,
                                                    seed, how):
    key = mx.random.key(seed)
    norm = _norm_of(kind, dims)
    norm.update(_noisy(norm.parameters()))
    reference = {k: v for k, v in tree_flatten(norm.parameters())}
    norm.set_dtype(dtype)
    stored = params(norm)
    # float32 reference: the same (rounded) parameters and input, float32 math
    ref_norm = _norm_of(kind, dims)
    ref_norm.load_weights([(k, v.astype(mx.float32)) for k, v in stored.items()])
    assert reference.keys() == stored.keys()
    x = (3 * mx.random.normal((batch, length, dims), key=key)).astype(dtype)
    want = ref_norm(x.astype(mx.float32))

    if "arch" in how:
        P.apply_architecture_norms(norm)
    if "scope" in how:
        with P.training_precision(norm):
            y = norm(x)
        assert params(norm).keys() == stored.keys()
        assert all(params(norm)[k] is v for k, v in stored.items())
    else:
        y = norm(x)
    assert y.dtype == dtype
    if kind == "gemma" or "scope" in how:  # float32 math
        assert mx.allclose(y.astype(mx.float32), want, rtol=TOL[dtype],
                           atol=TOL[dtype]).item()
