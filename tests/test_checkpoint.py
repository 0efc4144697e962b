"""Checkpoints: exact resume, signals, atomic writes, pruning."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import burnish
from burnish import Trainer, TrainingConfig
from burnish.checkpoint import checkpoint_dirs, read_checkpoint

ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f" {a + b}"}
        for a in range(6) for b in range(4)]


def make_model(path, full=False):
    model, tok = burnish.FastModel.from_pretrained(path, full_finetuning=full)
    if not full:
        model = burnish.FastModel.get_peft_model(model, r=4, lora_alpha=8,
                                                 lora_dropout=0.1, random_state=1)
    return model, tok


def config(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=8, learning_rate=5e-3,
                logging_steps=3, lr_scheduler_type="cosine", warmup_steps=2,
                seed=11, compute_dtype=None)  # bf16 stays bf16: the float32-master path
    base.update(kw)
    return TrainingConfig(**base)


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            trainer.request_stop()


def trained(model):
    return {k: np.array(v.astype(mx.float32))
            for k, v in tree_flatten(model.trainable_parameters())}


def losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full-bf16-masters"])
def test_stopped_and_resumed_equals_uninterrupted(model_factory, tmp_path, full):
    path = model_factory("llama", mx.bfloat16 if full else mx.float32)
    model, tok = make_model(path, full)
    whole = Trainer(model, tok, ROWS, config=config(tmp_path / "a"), progress=False).train()
    reference = trained(model)

    model, tok = make_model(path, full)
    first = Trainer(model, tok, ROWS, config=config(tmp_path / "b"), progress=False,
                    callbacks=[StopAt(4)]).train()
    assert first["steps"] == 4
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["checkpoint-4"]
    model, tok = make_model(path, full)  # a fresh process would start like this
    rest = Trainer(model, tok, ROWS, config=config(tmp_path / "b"),
                   progress=False).train(resume_from_checkpoint=True)
    assert rest["steps"] == 8
    resumed = trained(model)
    assert reference.keys() == resumed.keys()
    for k in reference:
        np.testing.assert_allclose(resumed[k], reference[k], atol=1e-6, rtol=0)
    assert rest["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() == {3, 6, 8}
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6)


def test_checkpoint_is_an_mlx_lm_adapter_folder(model_factory, tmp_path):
    from mlx_lm import load as mlx_load

    path = model_factory("llama", mx.float32)
    model, tok = make_model(path)
    Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=2, save_steps=2),
            progress=False).train()
    ckpt = tmp_path / "checkpoint-2"
    stock, _ = mlx_load(str(path), adapter_path=str(ckpt))
    prompt = mx.array([[1, 5, 9, 13]])
    model.eval()
    assert mx.allclose(stock(prompt), model(prompt), atol=1e-5)


def test_save_total_limit_prunes(model_factory, tmp_path):
    model, tok = make_model(model_factory("llama", mx.float32))
    Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=5, save_steps=1,
                                            save_total_limit=2), progress=False).train()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-5"]


def test_crash_while_saving_keeps_previous_checkpoint(model_factory, tmp_path, monkeypatch):
    model, tok = make_model(model_factory("llama", mx.float32))
    real = mx.save_safetensors
    calls = {"n": 0}

    def flaky(file, arrays, *a, **kw):
        if file.endswith("optimizer.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint dies halfway through
                real(file, arrays, *a, **kw)
                raise OSError("disk full (simulated)")
        return real(file, arrays, *a, **kw)

    monkeypatch.setattr(mx, "save_safetensors", flaky)
    trainer = Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=6, save_steps=2),
                      progress=False)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    monkeypatch.setattr(mx, "save_safetensors", real)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert read_checkpoint(tmp_path / "checkpoint-2")["state"]["step"] == 2
    model, tok = make_model(model_factory("llama", mx.float32))
    out = Trainer(model, tok, ROWS, config=config(tmp_path, max_steps=6),
                  progress=False).train(resume_from_checkpoint=tmp_path / "checkpoint-2")
    assert out["steps"] == 6


SCRIPT = textwrap.dedent("""
    import sys, time
    import burnish
    from burnish import Trainer, TrainingConfig
    path, out, resume, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f" {a + b}"}
            for a in range(6) for b in range(4)]
    model, tok = burnish.FastModel.from_pretrained(path)
    model = burnish.FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.1,
                                             random_state=1)
    class Slow:
        def on_step_end(self, trainer, step):
            if slow:
                time.sleep(0.3)
    cfg = TrainingConfig(output_dir=out, per_device_train_batch_size=2, max_steps=30,
                         learning_rate=5e-3, logging_steps=1, seed=3)
    Trainer(model, tok, rows, config=cfg, progress=False,
            callbacks=[Slow()]).train(resume_from_checkpoint=resume)
    burnish.save_adapters(model, out + "/final")
""")


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(model_factory, tmp_path):
    path = str(model_factory("llama", mx.float32))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = lambda out, resume, slow: [sys.executable, str(script), path, str(out),
                                     "1" if resume else "0", "1" if slow else "0"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(run(tmp_path / "b", False, True), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "training stopped by SIGTERM" in err
    saved = checkpoint_dirs(tmp_path / "b")
    assert len(saved) == 1 and 3 <= read_checkpoint(saved[0])["state"]["step"] < 30
    done = subprocess.run(run(tmp_path / "b", True, False), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run(run(tmp_path / "a", False, False), env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    a = mx.load(str(tmp_path / "a" / "final" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "final" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6, rtol=0), k
