"""Data-parallel throughput: 2 ranks (mlx.launch, ring on loopback) vs 1 rank.

Both train the same LoRA model on the same global batches: one process with
`per_device_train_batch_size` 2b, or two processes with b each (what
`burnish train --nproc 2` runs). Throughput is trained tokens per second of
training time (the Trainer's own clock, so process start and model loading
do not count), measured after the first steps; the runs alternate so that
load from other processes on a shared machine hits both alike.

On a machine whose cores the single process already uses, two ranks cannot
be twice as fast: they split the same cores (OpenBLAS threads split too, as
`burnish train --nproc` does) and add one gradient all_sum and one small
loss/stop all_sum per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "distributed"
CONFIG = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)
WARMUP = 2  # steps left out of the throughput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--distributed-batch", type=int, default=4,
                       help="per-rank batch b (one rank runs 2b)")
    group.add_argument("--distributed-steps", type=int, default=12)
    group.add_argument("--distributed-reps", type=int, default=2)


def _rows(n=96):
    words = "the quick brown fox jumps over the lazy dog while numbers count".split()
    return [{"prompt": " ".join(words[(i + j) % len(words)] for j in range(20 + i % 17)),
             "completion": " " + " ".join(words[(3 * i + j) % len(words)]
                                          for j in range(30 + i % 23))}
            for i in range(n)]


def _worker(model, data, out, batch, steps):
    """One rank (or the single process): train, print nothing, leave metrics.jsonl."""
    import burnish  # noqa: F401  (first)
    from burnish import FastModel, Trainer, TrainingConfig

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    m, tok = FastModel.from_pretrained(model)
    m = FastModel.get_peft_model(m, r=8, lora_alpha=16, random_state=0)
    cfg = TrainingConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=1e-4, logging_steps=1, seed=0)
    Trainer(m, tok, rows, config=cfg, progress=False).train()


def _throughput(out: Path) -> dict:
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "loss" in r]
    clock = [r["tokens"] / r["tokens_per_sec"] for r in logs]  # cumulative train time
    a, b = WARMUP - 1, len(logs) - 1
    tokens = logs[b]["tokens"] - logs[a]["tokens"]
    seconds = clock[b] - clock[a]
    return {"tokens_per_sec": tokens / seconds, "step_seconds": seconds / (b - a),
            "tokens_per_step": tokens / (b - a), "final_loss": logs[-1]["loss"]}


def _run(ranks, model, data, out, batch, steps) -> dict:
    from burnish.distributed import _free_ports, _launcher, local_rank_env

    # as `burnish train --nproc` runs ranks: BLAS threads split between them
    env = local_rank_env(ranks, dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(model), str(data),
          str(out), str(batch), str(steps)]
    if ranks == 1:
        cmd = me
    else:
        cmd = [*_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks),
               "--starting-port", str(_free_ports(ranks)), "--", *me]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.PIPE,
                          timeout=900)
    if proc.returncode != 0 or not (out / "metrics.jsonl").exists():
        raise RuntimeError(f"{ranks}-rank run failed: {proc.stderr[-2000:]}")
    return _throughput(out)


def run(args) -> dict:
    import burnish  # noqa: F401
    import mlx.core as mx
    from common import build_model, median

    b = getattr(args, "distributed_batch", 4)
    steps = getattr(args, "distributed_steps", 12)
    reps = getattr(args, "distributed_reps", 2)
    if getattr(args, "quick", False):
        steps, reps = min(steps, 8), 1
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "llama", "llama", dtype=mx.float32, **CONFIG)
        data = tmp / "rows.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
        for rep in range(reps):
            for ranks in ((1, 2) if rep % 2 == 0 else (2, 1)):
                out = tmp / f"out-{ranks}-{rep}"
                results[ranks].append(_run(ranks, model, data, out, 2 * b // ranks, steps))
    one, two = (median([r["tokens_per_sec"] for r in results[n]]) for n in (1, 2))
    paired = median([t["tokens_per_sec"] / o["tokens_per_sec"]
                     for o, t in zip(results[1], results[2])])
    rows = []
    for n in (1, 2):
        rs = results[n]
        rows.append([f"{n} rank{'s' if n > 1 else ''} x batch {2 * b // n}",
                     f"{median([r['tokens_per_sec'] for r in rs]):.0f}",
                     f"{median([r['step_seconds'] for r in rs]):.3f}",
                     f"{rs[0]['tokens_per_step']:.0f}",
                     "1.00x" if n == 1 else f"{paired:.2f}x"])
    return {
        "name": NAME,
        "title": "Data-parallel training: 2 ranks vs 1 (ring on loopback)",
        "description": (f"LoRA r=8 on a float32 Llama ({CONFIG['hidden_size']} hidden, "
                        f"{CONFIG['num_hidden_layers']} layers), global batch {2 * b}, "
                        f"{steps} steps ({WARMUP} warm-up steps left out), {reps} "
                        f"alternating repetition(s), {os.cpu_count()} CPU cores shared by "
                        "both ranks. Ratio: 2-rank / 1-rank tokens per second, paired "
                        "by repetition."),
        "columns": ["run", "tokens/s", "s/step", "tokens/step", "throughput vs 1 rank"],
        "rows": rows,
        "data": {"one_rank": results[1], "two_ranks": results[2], "ratio": paired,
                 "tokens_per_sec": {"1": one, "2": two}},
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, data, out, batch, steps = sys.argv[2:7]
        _worker(model, data, out, int(batch), int(steps))
    else:  # python benchmarks/bench_distributed.py: this bench alone
        sys.path.insert(0, str(HERE))
        parser = argparse.ArgumentParser()
        parser.add_argument("--quick", action="store_true")
        add_arguments(parser)
        result = run(parser.parse_args())
        print(json.dumps(result["rows"], indent=1))
