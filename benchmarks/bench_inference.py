"""Inference: burnish vs stock mlx-lm (decode, prefill; bf16 and 4-bit), the
memory-bandwidth bound of decoding, and (Linux CPU) the optimised-BLAS routing.

* burnish:  `burnish.loading.from_pretrained` + `burnish.generation.stream_generate`
* stock:    `mlx_lm.load` + `mlx_lm.stream_generate`

Greedy, no end-of-sequence stop (the tokenizer's EOS set is emptied for both),
the same random prompt; both report mlx-lm's own prompt/generation tok/s.
Bandwidth: a large float32 copy (bytes read + written / time), measured in
the same run; the decode bound is bandwidth / bytes of weights read per token.

BLAS routing has to be decided before `mlx.core` is imported, so those rows
come from child processes run with `BURNISH_BLAS=none` and with the default.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import burnish  # noqa: F401  (first: BLAS routing)
import mlx.core as mx

from burnish.backend import device_info
from common import build_model, median, n_params, weights_nbytes

NAME = "inference"
HERE = Path(__file__).resolve().parent

SIZES = {
    "full": dict(model=dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408,
                            num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                            max_position_embeddings=2048),
                 prompt=1024, decode=256, reps=5, blas_prompt=512, blas_examples=8),
    "quick": dict(model=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                             max_position_embeddings=1024),
                  prompt=256, decode=64, reps=3, blas_prompt=256, blas_examples=4),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference")
    group.add_argument("--inference-size", choices=sorted(SIZES), default=None,
                       help="model/prompt size (default: quick with --quick, else full)")
    group.add_argument("--inference-reps", type=int, default=None)


def bandwidth(nbytes=256 * 2**20, reps=5) -> float:
    """Bytes per second of a float32 copy (read + write)."""
    a = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        b = mx.array(a) + 0  # one read, one write
        mx.eval(b)
        times.append(time.perf_counter() - t)
        del b
    return 2 * nbytes / min(times)


def _load(kind, path):
    if kind == "stock":
        from mlx_lm import load

        model, tokenizer = load(str(path))
    else:
        from burnish.loading import from_pretrained

        model, tokenizer = from_pretrained(path)
    tokenizer.eos_token_ids = []  # decode exactly the requested tokens
    mx.eval(model.parameters())
    return model, tokenizer


def _generate(kind, model, tokenizer, prompt, max_tokens):
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    last = None
    cpu = time.process_time()
    if kind == "stock":
        from mlx_lm import stream_generate

        for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            pass
    else:
        from burnish.generation import stream_generate

        for last in stream_generate(model, tokenizer, prompt, max_new_tokens=max_tokens):
            pass
    return {"prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps,
            "tokens": last.generation_tokens, "peak": mx.get_peak_memory(),
            "cpu": time.process_time() - cpu}


def text_prompt(tokenizer, n) -> str:
    """A text of about `n` tokens (burnish's generate takes text or messages)."""
    import numpy as np

    words = ("the quick brown fox jumps over lazy dog what is two plus three five hello "
             "world this tiny model capital of zorbia quellton numbers letters").split()
    rng = np.random.default_rng(0)
    text = ""
    while len(tokenizer.encode(text)) < n:
        text += " ".join(words[i] for i in rng.integers(len(words), size=8)) + " "
    return text.strip()


def _quantized_copy(path: Path) -> Path:
    from mlx_lm.convert import convert

    out = path.parent / (path.name + "-4bit")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(path), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


def generation_rows(spec, reps, tmp):
    path = build_model(Path(tmp) / "llama", "llama", dtype=mx.bfloat16, **spec["model"])
    paths = {"bf16": path, "4-bit": _quantized_copy(path)}
    bw = bandwidth()
    out = {}
    for label, p in paths.items():
        models = {k: _load(k, p) for k in ("stock", "burnish")}
        prompt = text_prompt(models["stock"][1], spec["prompt"])
        short = text_prompt(models["stock"][1], 16)
        nbytes = weights_nbytes(models["stock"][0])
        params = n_params(models["stock"][0])
        for k, (m, t) in models.items():  # warm up
            _generate(k, m, t, short, 4)
        runs = {k: {"prefill": [], "decode": []} for k in models}
        for rep in range(reps):
            order = ["stock", "burnish"] if rep % 2 == 0 else ["burnish", "stock"]
            for k in order:
                m, t = models[k]
                runs[k]["prefill"].append(_generate(k, m, t, prompt, 1))
                runs[k]["decode"].append(_generate(k, m, t, short, spec["decode"]))
        out[label] = {"runs": runs, "weights_bytes": nbytes, "params": params}
        del models
    return out, bw


def child(blas_choice, spec_name):
    """Float32 prefill and float32 LoRA training speed in this process's BLAS."""
    import tempfile

    from burnish.backend import BLAS
    from burnish.loading import from_pretrained
    from burnish.peft import get_peft_model
    from burnish.trainer import Trainer, TrainingConfig

    spec = SIZES[spec_name]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "llama", "llama", dtype=mx.float32, **spec["model"])
        model, tok = from_pretrained(path)
        tok.eos_token_ids = []
        prompt = text_prompt(tok, spec["blas_prompt"])
        _generate("burnish", model, tok, text_prompt(tok, 16), 1)
        prefill = median([_generate("burnish", model, tok, prompt, 1)["prefill_tps"]
                          for _ in range(3)])
        get_peft_model(model, r=8, lora_alpha=16)
        rows = [{"text": " ".join(["the quick brown fox jumps over the lazy dog"] * (4 + 4 * i))}
                for i in range(spec["blas_examples"])]
        speeds = []
        for rep in range(2):
            config = TrainingConfig(output_dir=str(Path(tmp) / f"out{rep}"),
                                    per_device_train_batch_size=2, num_train_epochs=1,
                                    logging_steps=100, lr_scheduler_type="constant")
            speeds.append(Trainer(model, tok, rows, config=config, progress=False)
                          .train()["tokens_per_sec"])
    print(json.dumps({"blas": BLAS.status, "library": BLAS.library,
                      "prefill_f32_tps": prefill, "train_f32_tps": speeds[-1]}))


def blas_rows(spec_name):
    results = {}
    for choice in ("none", "default"):
        env = dict(os.environ)
        env.pop("BURNISH_BLAS", None)
        if choice == "none":
            env["BURNISH_BLAS"] = "none"
        proc = subprocess.run([sys.executable, str(Path(__file__)), "--child", spec_name],
                              env=env, capture_output=True, text=True, cwd=str(HERE))
        if proc.returncode:
            raise RuntimeError(f"BLAS child ({choice}) failed: {proc.stderr[-800:]}")
        results[choice] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    size = getattr(args, "inference_size", None) or ("quick" if quick else "full")
    spec = SIZES[size]
    reps = getattr(args, "inference_reps", None) or spec["reps"]
    info = device_info()
    with tempfile.TemporaryDirectory() as tmp:
        gen, bw = generation_rows(spec, reps, tmp)
    rows, data = [], {"bandwidth_bytes_per_s": bw}
    for label, g in gen.items():
        runs = g["runs"]
        bound = bw / g["weights_bytes"]
        for k in ("stock", "burnish"):
            pre = median([r["prefill_tps"] for r in runs[k]["prefill"]])
            dec = median([r["decode_tps"] for r in runs[k]["decode"]])
            # CPU time of this process: far less disturbed by other load than wall time
            pre_ratio = median([b["cpu"] / a["cpu"] for a, b in
                                zip(runs[k]["prefill"], runs["stock"]["prefill"])])
            dec_ratio = median([b["cpu"] / a["cpu"] for a, b in
                                zip(runs[k]["decode"], runs["stock"]["decode"])])
            wall = [median([a[f"{w}_tps"] / b[f"{w}_tps"] for a, b in
                            zip(runs[k][w], runs["stock"][w])]) for w in ("prefill", "decode")]
            peak_decode = max(r["peak"] for r in runs[k]["decode"])
            peak_prefill = max(r["peak"] for r in runs[k]["prefill"])
            stock_peak = max(r["peak"] for r in runs["stock"]["prefill"] + runs["stock"]["decode"])
            mem_ratio = max(peak_decode, peak_prefill) / stock_peak
            data[f"{label}/{k}"] = {"prefill_tps": pre, "decode_tps": dec,
                                    "prefill_ratio": pre_ratio, "decode_ratio": dec_ratio,
                                    "prefill_wall_ratio": wall[0], "decode_wall_ratio": wall[1],
                                    "peak_bytes": max(peak_decode, peak_prefill),
                                    "memory_ratio": mem_ratio, "decode_bound_tps": bound,
                                    "weights_bytes": g["weights_bytes"], "runs": runs[k]}
            rows.append([f"{label} {'stock mlx-lm' if k == 'stock' else 'burnish'}",
                         f"{pre:.1f}", f"{pre_ratio:.2f}x", f"{dec:.1f}", f"{dec_ratio:.2f}x",
                         f"{dec / bound:.0%}", f"{max(peak_decode, peak_prefill) / 1e6:.0f}",
                         f"{mem_ratio:.2f}x"])
    blas = None
    if info["backend"] == "cpu" and sys.platform.startswith("linux"):
        blas = blas_rows(size)
        data["blas"] = blas
        ref, opt = blas["none"], blas["default"]
        for key, label in (("prefill_f32_tps", "float32 prefill"),
                           ("train_f32_tps", "float32 LoRA training")):
            rows.append([f"{label}, reference BLAS vs {opt['blas']} OpenBLAS",
                         f"{ref[key]:.1f} -> {opt[key]:.1f}", f"{opt[key] / ref[key]:.2f}x",
                         "", "", "", "", ""])
    cfg = spec["model"]
    params = gen["bf16"]["params"]
    return {
        "name": NAME,
        "title": "Inference: burnish vs stock mlx-lm (bf16, 4-bit), decode bandwidth bound, BLAS",
        "description": (
            f"Random Llama, {params / 1e6:.1f}M parameters (hidden {cfg['hidden_size']}, "
            f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}); 4-bit: "
            "mlx_lm.convert (affine, group 64). Prefill: a "
            f"{spec['prompt']}-token prompt; decode: {spec['decode']} greedy tokens after a "
            f"16-token prompt; {reps} interleaved repetitions, medians; ratios are medians "
            "of per-repetition ratios to stock in CPU time of this process (the same work: "
            "other load on a shared machine disturbs it far less than wall time; wall-clock "
            "ratios are in results.json). Peak: MLX peak memory (weights included), the "
            f"larger of the two runs. Decode bound: measured copy bandwidth "
            f"({bw / 1e9:.1f} GB/s) / weight bytes per token. BLAS rows: float32 model, "
            "child processes with BURNISH_BLAS=none vs the default routing (prefill tok/s; "
            f"LoRA training trained tok/s). BLAS here: {info['blas']}."),
        "columns": ["model", "prefill tok/s", "prefill vs stock", "decode tok/s",
                    "decode vs stock", "decode / bandwidth bound", "peak MB",
                    "memory vs stock"],
        "rows": rows,
        "data": data,
        "config": {"size": size, **spec, "reps": reps, "params": params},
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(os.environ.get("BURNISH_BLAS", "default"), sys.argv[2])
        sys.exit(0)
    from common import main

    main(__doc__, add_arguments, run)
