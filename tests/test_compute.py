"""Training in a float32 compute dtype: weights float32 inside train(), back after."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from burnish.backend import BLAS
from burnish.compute import compute_dtype, resolve_compute_dtype
from burnish.errors import BurnishError
from burnish.loading import from_pretrained
from burnish.peft import get_peft_model
from burnish.trainer import Trainer, TrainingConfig

ROWS = [
    {"text": "the capital of zorbia is quellton."},
    {"text": "two plus three is five."},
    {"text": "hello world, this is a tiny model for tests."},
    {"text": "the quick brown fox jumps over the lazy dog"},
]


def params(model):
    return dict(tree_flatten(model.parameters()))


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), logging_steps=1, seed=0, max_steps=3,
                per_device_train_batch_size=2, lr_scheduler_type="constant",
                max_grad_norm=None, learning_rate=1e-2)
    base.update(kw)
    return TrainingConfig(**base)


class DtypeSpy:
    """Records the dtypes of the model's parameters during training."""

    def __init__(self):
        self.dtypes = set()

    def on_step_end(self, trainer, step):
        self.dtypes |= {v.dtype for _, v in tree_flatten(trainer.model.parameters())}


def test_bad_setting_is_rejected():
    with pytest.raises(BurnishError, match="compute_dtype='bfloat16'"):
        TrainingConfig(compute_dtype="bfloat16")
    with pytest.raises(BurnishError, match="compute_dtype='fp32'"):
        resolve_compute_dtype("fp32")


def test_auto_picks_float32_only_on_cpu_with_routed_blas():
    expected = (mx.float32 if mx.default_device() == mx.cpu and BLAS.status == "routed"
                else None)
    assert resolve_compute_dtype("auto") == expected
    assert resolve_compute_dtype(None) is None
    assert resolve_compute_dtype("float32") == mx.float32


def test_default_is_auto_float32_on_this_cpu_model_dtypes_on_a_gpu(model_factory, tmp_path):
    assert TrainingConfig().compute_dtype == "auto"
    model, tok = from_pretrained(model_factory("llama", mx.bfloat16))
    get_peft_model(model, r=4, lora_alpha=8)
    before = {k: v.dtype for k, v in params(model).items()}
    spy = DtypeSpy()
    metrics = Trainer(model, tok, ROWS, config=config(tmp_path), callbacks=[spy],
                      progress=False).train()
    routed = mx.default_device() == mx.cpu and BLAS.status == "routed"
    assert metrics["compute_dtype"] == ("float32" if routed else "model")
    assert (mx.bfloat16 in spy.dtypes) == (not routed)
    assert {k: v.dtype for k, v in params(model).items()} == before


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_trains_in_float32_and_keeps_checkpoint_dtypes(model_factory, tmp_path, quantized):
    model, tok = from_pretrained(model_factory("llama", mx.bfloat16), load_in_4bit=quantized)
    get_peft_model(model, r=4, lora_alpha=8)
    before = params(model)
    spy = DtypeSpy()
    metrics = Trainer(model, tok, ROWS, config=config(tmp_path, compute_dtype="float32"),
                      callbacks=[spy], progress=False).train()
    assert metrics["compute_dtype"] == "float32"
    assert mx.bfloat16 not in spy.dtypes and mx.float32 in spy.dtypes
    after = params(model)
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    changed = [k for k in after if not mx.array_equal(after[k], before[k]).item()]
    assert changed and all("lora_" in k for k in changed)  # the frozen base is bit-identical
    if quantized:
        assert any(v.dtype == mx.uint32 for v in after.values())


def test_float32_compute_loss_matches_bf16_compute(model_factory, tmp_path):
    runs = {}
    for setting in (None, "float32"):
        model, tok = from_pretrained(model_factory("llama", mx.bfloat16))
        get_peft_model(model, r=4, lora_alpha=8)
        trainer = Trainer(model, tok, ROWS, config=config(tmp_path / str(setting),
                                                          compute_dtype=setting),
                          progress=False)
        trainer.train()
        runs[setting] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # same data, same init: bf16 rounding is the only difference
    assert runs[None] == pytest.approx(runs["float32"], rel=2e-2)


def test_full_finetuning_needs_no_master_weights_in_float32(model_factory, tmp_path):
    model, tok = from_pretrained(model_factory("llama", mx.bfloat16), full_finetuning=True)
    before = params(model)
    trainer = Trainer(model, tok, ROWS, config=config(tmp_path, compute_dtype="float32"),
                      progress=False)
    trainer.train()
    assert trainer.master is None  # the float32 weights are the masters
    after = params(model)
    assert all(v.dtype == mx.bfloat16 for v in after.values())
    assert any(not mx.array_equal(after[k], before[k]).item() for k in after)


def test_scope_restores_dtypes_after_an_error(model_factory):
    model, _ = from_pretrained(model_factory("llama", mx.bfloat16))
    before = params(model)
    with pytest.raises(RuntimeError):
        with compute_dtype(model, mx.float32) as n:
            assert n == len(before)
            assert all(v.dtype == mx.float32 for v in params(model).values())
            raise RuntimeError("boom")
    after = params(model)
    assert all(after[k].dtype == mx.bfloat16 and mx.array_equal(after[k], before[k]).item()
               for k in before)
