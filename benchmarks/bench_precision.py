"""The regression the precision scope prevents: float32 norm weights in a bf16 model.

In MLX a float32 norm weight makes the norm return float32, and every later
bf16 Linear fed float32 returns float32: activations, KV cache and logits all
go float32. This loads the same random bf16 Llama (~30M parameters) four ways
and generates from the same prompt with each, interleaved, in one process:

* stock:            `mlx_lm.load`
* burnish:          `burnish.loading.from_pretrained` (checkpoint dtypes kept)
* burnish scope:    the same inside `training_precision` (float32 norm weights
                    and math, outputs cast back to bf16: what training uses)
* fp32 norms (bug): stock with the norm weights cast to float32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import burnish  # noqa: F401  (first)
import mlx.core as mx

from common import build_model, median, n_params, time_generation, weights_nbytes

NAME = "precision"
CONFIG = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408,
              num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
              max_position_embeddings=2048)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision")
    group.add_argument("--precision-prompt-tokens", type=int, default=128)
    group.add_argument("--precision-decode-tokens", type=int, default=24)
    group.add_argument("--precision-reps", type=int, default=7)


def _variants(path: Path):
    from contextlib import ExitStack

    from mlx_lm import load as mlx_load

    from burnish.loading import from_pretrained
    from burnish.precision import norm_parameter_paths, training_precision

    stock, _ = mlx_load(str(path))
    ours, _ = from_pretrained(path)
    scoped, _ = from_pretrained(path)
    buggy, _ = mlx_load(str(path))
    buggy.load_weights([(k, v.astype(mx.float32)) for k, v in
                        _flat(buggy).items() if k in norm_parameter_paths(buggy)], strict=False)
    stack = ExitStack()
    stack.enter_context(training_precision(scoped))
    mx.eval(stock.parameters(), ours.parameters(), scoped.parameters(), buggy.parameters())
    return {
        "stock mlx-lm": stock,
        "burnish": ours,
        "burnish training scope": scoped,
        "fp32 norm weights (bug)": buggy,
    }, stack


def _flat(model):
    from mlx.utils import tree_flatten
    return dict(tree_flatten(model.parameters()))


def run(args) -> dict:
    prompt_tokens = getattr(args, "precision_prompt_tokens", 128)
    decode_tokens = getattr(args, "precision_decode_tokens", 24)
    reps = getattr(args, "precision_reps", 7)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "llama", "llama", dtype=mx.bfloat16, **CONFIG)
        models, stack = _variants(path)
        with stack:
            prompt = mx.random.randint(0, CONFIG["vocab_size"], (prompt_tokens,),
                                       key=mx.random.key(0))
            names = list(models)
            for name in names:  # warm up
                time_generation(models[name], prompt[:16], 4)
            runs = {name: [] for name in names}
            for rep in range(reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    runs[name].append(time_generation(models[name], prompt, decode_tokens))
            params = n_params(models["stock mlx-lm"])
            facts = {}
            for name in names:
                model = models[name]
                logits = model(prompt[None, :8])
                facts[name] = {
                    "weights_bytes": weights_nbytes(model),
                    "logits_dtype": str(logits.dtype).split(".")[-1],
                }
    stock = "stock mlx-lm"
    rows, data = [], {}

    def paired(name, key):
        # Ratio to the stock run of the same repetition (adjacent in time), so
        # that load from other processes on a shared machine cancels out.
        return median([r[key] / s[key] for r, s in zip(runs[name], runs[stock])])

    for name in names:
        prefill = median([r["prefill_tps"] for r in runs[name]])
        decode = median([r["decode_tps"] for r in runs[name]])
        memory = facts[name]["weights_bytes"] + median([r["peak_run_bytes"] for r in runs[name]])
        stock_memory = facts[stock]["weights_bytes"] + median(
            [r["peak_run_bytes"] for r in runs[stock]])
        same = all(r["tokens"] == s["tokens"] for r, s in zip(runs[name], runs[stock]))
        data[name] = {
            "prefill_tps": prefill, "decode_tps": decode, "peak_bytes": memory,
            "prefill_cpu_tps": median([r["prefill_cpu_tps"] for r in runs[name]]),
            "decode_cpu_tps": median([r["decode_cpu_tps"] for r in runs[name]]),
            "prefill_ratio": paired(name, "prefill_cpu_tps"),
            "decode_ratio": paired(name, "decode_cpu_tps"),
            "prefill_wall_ratio": paired(name, "prefill_tps"),
            "decode_wall_ratio": paired(name, "decode_tps"),
            "memory_ratio": memory / stock_memory,
            "logits_dtype": facts[name]["logits_dtype"],
            "same_tokens_as_stock": same,
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs[name]],
        }
        d = data[name]
        rows.append([name, f"{prefill:.1f}", f"{decode:.1f}",
                     f"{d['prefill_ratio']:.2f}x", f"{d['decode_ratio']:.2f}x",
                     f"{memory / 1e6:.0f}", f"{d['memory_ratio']:.2f}x",
                     d["logits_dtype"], "yes" if same else "no"])
    return {
        "name": NAME,
        "title": "bf16 inference: checkpoint dtypes vs float32 norm weights",
        "description": (
            f"Random bf16 Llama, {params / 1e6:.1f}M parameters "
            f"(hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, "
            f"vocab {CONFIG['vocab_size']}); greedy generation with mlx-lm's "
            f"generate_step from a {prompt_tokens}-token prompt, {decode_tokens} new tokens; "
            f"{reps} interleaved repetitions. tok/s: wall-clock medians. Speed ratios: "
            "medians of the ratio to the stock run of the same repetition, measured "
            "in tokens per CPU-second of this process, which other processes on a "
            "shared machine disturb far less than wall time (wall-clock ratios are "
            "in results.json). Peak memory = "
            "weights + MLX peak allocation during the run (activations, KV cache). "
            "Float32 norm math in the training scope changes rounding, so its greedy "
            "tokens may differ from stock."),
        "columns": ["model", "prefill tok/s", "decode tok/s", "prefill vs stock",
                    "decode vs stock", "peak MB", "memory vs stock", "logits",
                    "same tokens as stock"],
        "rows": rows,
        "data": data,
        "config": {**CONFIG, "prompt_tokens": prompt_tokens,
                   "decode_tokens": decode_tokens, "reps": reps, "params": params},
    }


if __name__ == "__main__":
    from common import main

    main(__doc__, add_arguments, run)
