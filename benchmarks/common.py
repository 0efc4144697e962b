"""Shared helpers for the benchmarks: random models, generation timing, memory."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import burnish  # noqa: F401  (first: routes float32 matmuls to OpenBLAS on Linux CPU)
import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent


def _tiny():
    """tests/tiny.py, the builder of random Hugging Face model folders."""
    spec = importlib.util.spec_from_file_location("burnish_bench_tiny", ROOT / "tests" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(folder, model_type="llama", dtype=mx.bfloat16, seed=0, **config) -> Path:
    """A random `model_type` model in `folder` (HF layout, tokenizer from
    tests/tiny.py); `config` overrides the tiny config, vocab_size included."""
    import json

    from mlx_lm.utils import _get_classes

    tiny = _tiny()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.make_tokenizer(folder)
    full = {**tiny.BASE, **tiny.CONFIGS[model_type], "vocab_size": len(tokenizer), **config}
    mx.random.seed(seed)
    model_class, args_class = _get_classes(full)
    model = model_class(args_class.from_dict(full))
    weights = dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        if "norm" in k:  # random scales, as trained models have
            weights[k] = v + 0.1 * mx.random.normal(v.shape)
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: v.astype(dtype) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    full["torch_dtype"] = str(dtype).split(".")[-1]
    full["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (folder / "config.json").write_text(json.dumps(full, indent=2))
    return folder


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def weights_nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def median(values):
    return statistics.median(values)


def time_generation(model, prompt: mx.array, decode_tokens: int) -> dict:
    """Greedy generation with mlx-lm's `generate_step` (KV cache, no EOS stop).

    Prefill tok/s: prompt tokens / time to the first token. Decode tok/s: the
    remaining tokens / their time. Peak: MLX's peak memory during the run
    above what was allocated before it (activations, KV cache, temporaries).
    """
    from mlx_lm.generate import generate_step

    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for i, (token, _) in enumerate(generate_step(prompt, model, max_tokens=decode_tokens + 1)):
        tokens.append(int(token))
        if i == 0:
            first, first_cpu = time.perf_counter(), time.process_time()
    end, end_cpu = time.perf_counter(), time.process_time()
    peak = mx.get_peak_memory() - base
    return {
        "prefill_tps": prompt.size / (first - start),
        "decode_tps": decode_tokens / (end - first),
        # per CPU-second of this process (all its threads): robust to other load
        "prefill_cpu_tps": prompt.size / (first_cpu - start_cpu),
        "decode_cpu_tps": decode_tokens / (end_cpu - first_cpu),
        "peak_run_bytes": peak,
        "tokens": tokens,
    }


def main(doc: str, add_arguments, run) -> None:
    """Run one bench module on its own (`python benchmarks/bench_X.py [--quick]`)
    and print its table."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    add_arguments(parser)
    result = run(parser.parse_args())
    print(result["description"])
    print(" | ".join(result["columns"]))
    for row in result["rows"]:
        print(" | ".join(row))
