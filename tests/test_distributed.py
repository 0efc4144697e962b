"""Data-parallel training: 2 ranks on loopback (mlx.launch, ring backend).

Every distributed run is a real pair of processes; the single-rank reference
runs in this process.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import burnish
from burnish import Trainer, TrainingConfig
from burnish.distributed import _free_ports, shard, sync_step, World

# 13 rows: the last global batch of 4 has one example, so rank 1's slice of it
# is empty (a zero-weight stand-in row); completions of different lengths make
# the token weighting matter.
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": " " + " ".join([str(a + b)] * (1 + a))}
        for a in range(4) for b in range(3)] + [{"prompt": "and?", "completion": " done"}]

STEPS = dict(max_steps=4, gradient_accumulation_steps=2, lr_scheduler_type="cosine",
             warmup_steps=1, logging_steps=1, seed=5)

WORKER = textwrap.dedent('''
    import json, sys
    import burnish
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from burnish import Trainer, TrainingConfig

    model_path, out, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rows = [json.loads(l) for l in open(sys.argv[4])]

    def run(folder, resume=None, eval_rows=None, **kw):
        model, tok = burnish.FastModel.from_pretrained(model_path)
        model = burnish.FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
        cfg = TrainingConfig(output_dir=f"{out}/{folder}", per_device_train_batch_size=2,
                             **{"learning_rate": 5e-3, **steps, **kw})
        t = Trainer(model, tok, rows, eval_dataset=eval_rows, config=cfg, progress=False)
        metrics = t.train(resume_from_checkpoint=resume)
        r = t.world.rank
        mx.save_safetensors(f"{out}/{folder}-rank{r}.safetensors",
                            dict(tree_flatten(model.trainable_parameters())))
        losses = [h["loss"] for h in t.state.log_history if "loss" in h]
        json.dump({"size": t.world.size, "losses": losses, "eval_loss": metrics.get("eval_loss")},
                  open(f"{out}/{folder}-rank{r}.json", "w"))

    run("sgd", optim="sgd", learning_rate=0.5, eval_rows=rows[:7])  # equivalence of the weights
    run("full", save_steps=1)                                # adamw, checkpoint every step
    run("resumed", resume=f"{out}/full/checkpoint-1")        # resumed on 2 ranks mid-epoch
''')


def env():
    return dict(os.environ, TRANSFORMERS_VERBOSITY="error")


def launch(n, *command, **kw):
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    return subprocess.run([launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n),
                           "--starting-port", str(_free_ports(n)), "--", *command],
                          capture_output=True, text=True, env=env(), stdin=subprocess.PIPE, **kw)


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_shards_cover_each_global_batch_in_order():
    for n in range(0, 9):
        entry = list(range(n))
        parts = [shard(entry, r, 2) for r in range(2)]
        assert parts[0] + parts[1] == entry and abs(len(parts[0]) - len(parts[1])) <= 1
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]  # rank r: the r-th slice of b


def test_single_rank_sync_is_a_no_op():
    s = mx.array(3.0)
    assert sync_step(World(), mx.array(1.0), s, "request") == (s, "request")


def test_two_ranks_equal_one_rank_with_double_batch_and_resume_is_exact(model_factory, tmp_path):
    base = model_factory("llama", mx.float32)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "dist"
    proc = launch(2, sys.executable, str(worker), str(base), str(out), json.dumps(STEPS),
                  str(data), timeout=240)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in ("sgd", "full", "resumed"):
        for r in (0, 1):
            assert (out / f"{name}-rank{r}.json").exists(), proc.stderr[-3000:]

    def one_rank(eval_rows=None, **kw):  # batch 4 = 2 ranks x 2, same seed, same rows
        model, tok = burnish.FastModel.from_pretrained(base)
        model = burnish.FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
        t = Trainer(model, tok, ROWS, eval_dataset=eval_rows, progress=False,
                    config=TrainingConfig(output_dir=str(tmp_path / "one"),
                                          per_device_train_batch_size=4,
                                          **{"learning_rate": 5e-3, **STEPS, **kw}))
        metrics = t.train()
        return ([h["loss"] for h in t.state.log_history if "loss" in h],
                {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())},
                metrics.get("eval_loss"))

    def two_ranks(name):
        runs = [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        assert runs[0]["size"] == 2 and len(runs[0]["losses"]) == 4
        # metrics are reduced over ranks: both report the global losses
        assert runs[1]["losses"] == runs[0]["losses"]
        w0, w1 = (weights(out / f"{name}-rank{r}.safetensors") for r in (0, 1))
        for k in w0:
            np.testing.assert_array_equal(w0[k], w1[k])  # gradients reduced identically
        assert runs[1]["eval_loss"] == runs[0]["eval_loss"]
        return runs[0]["losses"], w0, runs[0]["eval_loss"]

    # SGD: the update is linear in the gradient, so the weights show the
    # reduction itself (Adam divides by sqrt(v) and blows float rounding in
    # near-zero gradients up to ~lr)
    ref_losses, ref_w, ref_eval = one_rank(optim="sgd", learning_rate=0.5, eval_rows=ROWS[:7])
    losses, w, eval_loss = two_ranks("sgd")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    # evaluation is sharded too (7 rows: uneven slices), reduced over ranks
    np.testing.assert_allclose(eval_loss, ref_eval, rtol=1e-5)
    assert set(w) == set(ref_w)
    for k in ref_w:
        np.testing.assert_allclose(w[k], ref_w[k], rtol=1e-5, atol=1e-5)
    assert np.abs(ref_w["model.layers.0.self_attn.q_proj.lora_b"]).max() > 1e-3  # it trained

    ref_losses, _, _ = one_rank()  # adamw
    full_losses, w0, _ = two_ranks("full")
    np.testing.assert_allclose(full_losses, ref_losses, rtol=1e-5, atol=1e-6)

    # resumed from checkpoint-1 on 2 ranks == uninterrupted
    resumed = json.loads((out / "resumed-rank0.json").read_text())
    # (the log history up to step 1 comes from the checkpoint)
    np.testing.assert_allclose(resumed["losses"], full_losses, rtol=1e-6)
    for r in (0, 1):
        wr = weights(out / f"resumed-rank{r}.safetensors")
        for k in w0:
            np.testing.assert_allclose(wr[k], w0[k], rtol=1e-6, atol=1e-7)

    # rank 0 alone wrote metrics, the plot and checkpoints
    records = [json.loads(l) for l in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (out / "full" / "loss.png").exists()
    assert sorted(p.name for p in (out / "full").glob("checkpoint-*")) == [
        f"checkpoint-{i}" for i in (1, 2, 3, 4)]


def write_run(tmp_path, base, out, max_steps: int) -> Path:
    """A `burnish train` YAML file for ROWS on `base` (LoRA r=4, batch 2)."""
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""
        model:
          model_name: {base}
        peft:
          r: 4
        data:
          train: train.jsonl
        training:
          output_dir: {out}
          max_steps: {max_steps}
          per_device_train_batch_size: 2
          logging_steps: 1
    """))
    return path


def test_nproc_run_finishes_and_cleans_up_its_rank_records(model_factory, tmp_path):
    out = tmp_path / "out"
    run = write_run(tmp_path, model_factory("llama", mx.float32), out, max_steps=2)
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "train", str(run), "--nproc", "2"],
                          capture_output=True, text=True, env=env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapters" / "adapters.safetensors").exists()
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in l][-1] == 2
    assert not (out / ".burnish-ranks").exists()  # only kept after a failure


def test_killing_a_rank_stops_the_run_naming_it(model_factory, tmp_path):
    out = tmp_path / "out"
    run = write_run(tmp_path, model_factory("llama", mx.float32), out, max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "burnish.cli", "train", str(run), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.monotonic() + 120
        record = out / ".burnish-ranks" / "rank-1.json"
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if record.exists() and metrics.exists() and metrics.read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        pid = json.loads(record.read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None)
    last = [l for l in err.splitlines() if l.startswith("burnish: error:")][-1]
    assert "rank 1 died" in last and "SIGKILL" in last, err[-3000:]
    # rank 0 stopped on its own and said why
    assert "rank 0 stopped: rank 1 died" in err, err[-3000:]
