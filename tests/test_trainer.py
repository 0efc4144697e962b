import json
import math
import os
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from burnish import optim as opt
from burnish.data import iterate_batches
from burnish.errors import BurnishError
from burnish.loading import from_pretrained
from burnish.losses import loss_and_count
from burnish.peft import get_peft_model, is_gradient_checkpointed
from burnish.precision import norm_parameter_paths, training_precision
from burnish.trainer import Trainer, TrainingConfig

ROWS = [
    {"text": "the capital of zorbia is quellton."},
    {"text": "two plus three is five."},
    {"text": "hello world, this is a tiny model for tests."},
    {"text": "the quick brown fox jumps over the lazy dog"},
]
# Very unequal lengths: a mean of per-batch means differs from the token mean.
UNEQUAL = [
    {"text": "hello"},
    {"text": "two plus three"},
    {"text": "the quick brown fox jumps over the lazy dog " * 3},
    {"text": "numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g " * 2},
]


def config(tmp_path, **kw):
    # compute_dtype=None: the model's own dtypes, the path every GPU takes
    # ("auto", the default, trains in float32 on this CPU: test_compute.py)
    base = dict(output_dir=str(tmp_path / "out"), logging_steps=1, seed=0,
                per_device_train_batch_size=4, lr_scheduler_type="constant",
                max_grad_norm=None, compute_dtype=None)
    base.update(kw)
    return TrainingConfig(**base)


def params(model):
    return dict(tree_flatten(model.parameters()))


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --- configuration and schedules ----------------------------------------------


def test_config_validation():
    with pytest.raises(BurnishError, match="lr_scheduler_type='cosine_with_restarts'.*linear, cosine, constant"):
        TrainingConfig(lr_scheduler_type="cosine_with_restarts")
    with pytest.raises(BurnishError, match="optim='lion'.*adamw, adam, sgd, adafactor"):
        TrainingConfig(optim="lion")
    with pytest.raises(BurnishError, match="per_device_train_batch_size=0"):
        TrainingConfig(per_device_train_batch_size=0)
    with pytest.raises(BurnishError, match="warmup_ratio=1.5"):
        TrainingConfig(warmup_ratio=1.5)
    with pytest.warns(UserWarning, match="8-bit optimizer state"):
        assert TrainingConfig(optim="adamw_8bit").optim == "adamw"
    assert TrainingConfig(optim="adamw_torch").optim == "adamw"


def test_schedules():
    def values(name, total=10, warmup=2):
        s = opt.build_schedule(name, 1.0, total, warmup)
        return [round(s(mx.array(i)).item(), 5) for i in range(total + 1)]

    assert values("linear") == [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0]
    cos = values("cosine")
    assert cos[:3] == [0, 0.5, 1] and cos[6] == 0.5 and cos[10] == 0
    assert values("constant") == [0, 0.5] + [1] * 9
    assert values("constant", warmup=0) == [1] * 11
    assert opt.warmup_steps(10, 0, 0.25) == 3 and opt.warmup_steps(10, 4, 0.25) == 4


def test_trainer_uses_schedule_and_rejects_frozen_model(model_factory, tmp_path):
    model, tok = from_pretrained(model_factory("llama", dtype=mx.float32))
    with pytest.raises(BurnishError, match="no trainable parameters"):
        Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=2), progress=False).train()
    assert type(model.model.norm) is nn.RMSNorm  # the scope was undone
    get_peft_model(model, r=4)
    cfg = config(tmp_path, max_steps=4, warmup_steps=2, lr_scheduler_type="linear",
                 learning_rate=1e-3)
    tr = Trainer(model, tok, ROWS, config=cfg, progress=False, compile=False)
    tr.train()
    lrs = [h["learning_rate"] for h in tr.state.log_history]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


# --- each kind of fine-tuning learns; frozen parameters stay put ----------------


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora", "full"])
def test_memorisation_lowers_loss(model_factory, tmp_path, kind):
    path = model_factory("llama")
    model, tok = from_pretrained(path, load_in_4bit=kind == "qlora",
                                 full_finetuning=kind == "full")
    if kind != "full":
        get_peft_model(model, r=8, lora_alpha=16, use_dora=kind == "dora")
    before = params(model)
    trained = {k for k, _ in tree_flatten(model.trainable_parameters())}
    lr = 2e-3 if kind == "full" else 2e-2
    tr = Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=10, learning_rate=lr),
                 progress=False, compile=False)
    metrics = tr.train()
    curve = losses(tr)
    assert curve[-1] < curve[0] - 1.0, curve
    assert metrics["steps"] == 10 and metrics["tokens"] > 0
    after = params(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k  # checkpoint dtypes again
        if k not in trained:
            assert mx.array_equal(after[k], v).item(), f"frozen {k} changed"
    changed = [k for k in trained if not mx.array_equal(after[k], before[k]).item()]
    assert len(changed) == len(trained) if kind == "full" else changed


# --- the precision scope around train() ---------------------------------------


class Probe:
    """Looks at the model inside training; optionally fails at a step."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.seen = []

    def on_step_end(self, trainer, step):
        m = trainer.model
        logits = m(mx.array([[1, 2, 3, 4]]))
        self.seen.append((m.model.norm.weight.dtype, m.layers[0].input_layernorm.weight.dtype,
                          logits.dtype, type(m.model.norm) is nn.RMSNorm))
        if step == self.fail_at:
            raise RuntimeError("injected failure")


def same_as_fresh_with_adapters(model, tok, path, **peft):
    import mlx_lm

    fresh, _ = from_pretrained(path)
    get_peft_model(fresh, **peft)
    fresh.load_weights(list(tree_flatten(model.trainable_parameters())), strict=False)
    x = mx.array([[5, 6, 7, 8, 9]])
    assert mx.array_equal(model(x), fresh(x)).item()
    prompt = "the capital of zorbia is"
    a = mlx_lm.generate(model, tok, prompt, max_tokens=8, verbose=False)
    b = mlx_lm.generate(fresh, tok, prompt, max_tokens=8, verbose=False)
    assert a == b


@pytest.mark.parametrize("fail_at", [None, 2])
def test_precision_inside_training_and_restored_after(model_factory, tmp_path, fail_at):
    path = model_factory("llama")
    model, tok = from_pretrained(path)
    get_peft_model(model, r=4, lora_alpha=8)
    dtypes = {k: v.dtype for k, v in params(model).items()}
    probe = Probe(fail_at)
    tr = Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=3, learning_rate=1e-2),
                 callbacks=[probe], progress=False, compile=False)
    if fail_at:
        with pytest.raises(RuntimeError, match="injected failure"):
            tr.train()
        assert len(probe.seen) == fail_at
    else:
        tr.train()
    # inside: float32 norm weights, bf16 activations (logits), scoped norm class
    assert set(probe.seen) == {(mx.float32, mx.float32, mx.bfloat16, False)}
    # after: checkpoint dtypes and classes, eval mode as loaded
    assert {k: v.dtype for k, v in params(model).items()} == dtypes
    assert all(type(m) is nn.RMSNorm for _, m in model.named_modules()
               if "norm" in type(m).__name__.lower())
    assert not model.training
    same_as_fresh_with_adapters(model, tok, path, r=4, lora_alpha=8)


# --- the step ------------------------------------------------------------------


def test_accumulation_is_token_weighted(model_factory, tmp_path):
    path = model_factory("llama", dtype=mx.float32)
    runs = {}
    for bs, ga in ((4, 1), (2, 2)):
        model, tok = from_pretrained(path, full_finetuning=True)
        cfg = config(tmp_path, max_steps=2, optim="sgd", learning_rate=0.5,
                     per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        tr = Trainer(model, tok, UNEQUAL, config=cfg, progress=False, compile=False)
        tr.train()
        runs[bs] = (losses(tr), params(model), tr)
    (l4, p4, _), (l2, p2, tr2) = runs[4], runs[2]
    assert l4 == pytest.approx(l2, abs=1e-6)
    for k in p4:
        assert mx.allclose(p4[k], p2[k], atol=1e-6, rtol=0).item(), k
    # ...and a mean of per-batch means would have given another loss.
    fresh, _ = from_pretrained(path)
    sums = [loss_and_count(fresh, b)[0].item() for b in iterate_batches(
        tr2.train_examples, 2, seed=0, epoch=0)]
    counts = [b.n_tokens for b in iterate_batches(tr2.train_examples, 2, seed=0, epoch=0)]
    token_mean = sum(sums) / sum(counts)
    mean_of_means = np.mean([s / n for s, n in zip(sums, counts)])
    assert l2[0] == pytest.approx(token_mean, abs=1e-5)
    assert abs(mean_of_means - token_mean) > 0.01


def test_weight_decay_skips_norms_and_biases(model_factory, tmp_path):
    path = model_factory("stablelm", dtype=mx.float32, use_qkv_bias=True)
    model0, tok = from_pretrained(path, full_finetuning=True)
    p0 = params(model0)
    mask = dict(tree_flatten(opt.decay_mask(model0, model0.trainable_parameters())))
    norms = norm_parameter_paths(model0)
    assert "model.layers.0.self_attn.q_proj.bias" in mask and norms
    assert "model.layers.0.input_layernorm.bias" in norms
    assert "model.layers.0.self_attn.q_layernorm.norms.0.weight" in norms
    assert {k for k, v in mask.items() if not v} == norms | {k for k in mask if k.endswith(".bias")}

    lr, wd = 1e-2, 0.5
    out = {}
    for decay in (0.0, wd):
        model, tok = from_pretrained(path, full_finetuning=True)
        cfg = config(tmp_path, max_steps=1, learning_rate=lr, weight_decay=decay)
        Trainer(model, tok, ROWS, config=cfg, progress=False, compile=False).train()
        out[decay] = params(model)
    for k, v in out[0.0].items():
        if not mask[k]:
            assert mx.array_equal(out[wd][k], v).item(), f"{k} was decayed"
        else:  # decoupled: p - lr * (adam step) - lr * wd * p
            expected = v - lr * wd * p0[k]
            assert mx.allclose(out[wd][k], expected, atol=1e-6, rtol=0).item(), k


def test_bf16_master_weights_track_float32(model_factory, tmp_path):
    path = model_factory("llama")  # bf16 checkpoint

    def run(dtype, master):
        model, tok = from_pretrained(path, full_finetuning=True, dtype=dtype)
        before = params(model)
        cfg = config(tmp_path, max_steps=8, learning_rate=1e-5)
        tr = Trainer(model, tok, ROWS, config=cfg, progress=False, master_weights=master,
                     compile=False)
        tr.train()
        after = params(model)
        k = "model.layers.0.mlp.gate_proj.weight"
        assert after[k].dtype == (dtype or mx.bfloat16)
        assert after["model.norm.weight"].dtype == (dtype or mx.bfloat16)
        changed = (after[k] != before[k]).astype(mx.float32).mean().item()
        curve = np.array(losses(tr))
        return curve - curve[0], changed

    ref, _ = run(mx.float32, True)  # the same weights, trained in float32
    master, changed_master = run(None, True)
    plain, changed_plain = run(None, False)
    drop = -ref[-1]
    assert drop > 0.05
    # bf16 with float32 masters follows the float32 curve; plain bf16 loses
    # most updates (too small to change a bf16 weight) and lags far behind.
    assert abs(master[-1] - ref[-1]) < 0.25 * drop, (ref, master)
    assert -plain[-1] < 0.5 * drop, (ref, plain)
    assert changed_master > 0.8 and changed_plain < 0.5, (changed_master, changed_plain)


def _compiled_vs_eager(path, tmp_path, modes, **model_kw):
    runs = []
    for mode in modes:
        model, tok = from_pretrained(path, **model_kw)
        if not model_kw.get("full_finetuning"):
            get_peft_model(model, r=4)
        cfg = config(tmp_path, max_steps=3, learning_rate=1e-2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_grad_norm=1.0)
        tr = Trainer(model, tok, UNEQUAL, config=cfg, progress=False, compile=mode != "eager")
        if mode == "fallback":
            # a loss that reads a value on the host cannot be compiled
            def host_sync_loss(model, batch, scale):
                total, count = loss_and_count(model, batch)
                assert total.item() > 0
                return total * scale, (total, count)

            tr._loss = host_sync_loss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.train()
        fell_back = any("mx.compile failed" in str(w.message) for w in caught)
        assert fell_back == (mode == "fallback")
        runs.append((losses(tr), params(model)))
    return runs


# On CPU, MLX builds each fused kernel of a compiled graph with a C++ compiler
# the first time (minutes for a training step with a cold cache), so the
# compiled-step checks run on GPUs or when asked for.
needs_compile = pytest.mark.skipif(
    mx.default_device() != mx.gpu and not os.environ.get("BURNISH_TEST_COMPILE"),
    reason="compiled step on CPU JIT-builds kernels (slow when cold); "
           "set BURNISH_TEST_COMPILE=1",
)


# "fallback": tracing fails before any kernel is built, so it is cheap on CPU too.
@pytest.mark.parametrize("mode", ["fallback", pytest.param("compiled", marks=needs_compile)])
def test_compiled_or_fallback_step_equals_eager(model_factory, tmp_path, mode):
    (eager, pe), (other, po) = _compiled_vs_eager(
        model_factory("llama", dtype=mx.float32), tmp_path, ("eager", mode))
    assert other == pytest.approx(eager, abs=1e-5)
    for k, v in pe.items():
        assert mx.allclose(v, po[k], atol=1e-5).item(), k


@needs_compile
def test_compiled_step_with_bf16_master_weights(model_factory, tmp_path):
    (eager, pe), (compiled, pc) = _compiled_vs_eager(
        model_factory("llama"), tmp_path, ("eager", "compiled"), full_finetuning=True)
    # fused kernels round bf16 intermediates differently: close, not equal
    assert compiled == pytest.approx(eager, abs=2e-2)
    assert all(v.dtype == pc[k].dtype for k, v in pe.items())


def test_gradient_checkpointing_and_packing(model_factory, tmp_path):
    path = model_factory("llama", dtype=mx.float32)
    curves = []
    for checkpointing in (False, True):
        model, tok = from_pretrained(path)
        get_peft_model(model, r=4)
        cfg = config(tmp_path, max_steps=3, learning_rate=1e-2, packing=True,
                     max_seq_length=64, per_device_train_batch_size=2,
                     gradient_checkpointing=checkpointing)
        tr = Trainer(model, tok, UNEQUAL + ROWS, config=cfg, progress=False, compile=False)
        tr.train()
        curves.append(losses(tr))
        assert not any(is_gradient_checkpointed(b) for b in model.layers)
    assert curves[1] == pytest.approx(curves[0], abs=1e-5)


# --- outputs --------------------------------------------------------------------


def test_metrics_plot_and_evaluate(model_factory, tmp_path):
    model, tok = from_pretrained(model_factory("llama", dtype=mx.float32))
    get_peft_model(model, r=4)
    cfg = config(tmp_path, max_steps=4, learning_rate=1e-2, logging_steps=2, eval_steps=2,
                 per_device_train_batch_size=2)
    tr = Trainer(model, tok, ROWS, eval_dataset=UNEQUAL, config=cfg, progress=False,
                 compile=False)
    metrics = tr.train()
    for key in ("train_loss", "steps", "tokens", "tokens_per_sec", "peak_memory_gb",
                "eval_loss", "eval_perplexity"):
        assert key in metrics
    lines = [json.loads(s) for s in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert {"learning_rate", "grad_norm", "tokens_per_sec", "peak_memory_gb"} <= set(train[0])
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # train_loss is the token-weighted mean over the run
    total_tokens = metrics["tokens"]
    assert metrics["train_loss"] == pytest.approx(
        sum(r["loss"] * (r["tokens"] - p) for r, p in zip(train, [0, train[0]["tokens"]]))
        / total_tokens)

    result = tr.evaluate()
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    with training_precision(model):
        parts = [loss_and_count(model, b) for b in iterate_batches(
            tr.eval_examples, 1, seed=0, epoch=0, shuffle=False)]
    manual = sum(s.item() for s, _ in parts) / sum(n.item() for _, n in parts)
    assert result["eval_loss"] == pytest.approx(manual, abs=1e-5)


def test_rng_key_round_trip():
    from burnish.trainer import rng_key, set_rng_key

    mx.random.seed(7)
    mx.random.normal((3,))
    key = rng_key()
    a = mx.random.normal((4,))
    set_rng_key(key)
    assert mx.array_equal(mx.random.normal((4,)), a).item()
