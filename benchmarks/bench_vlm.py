"""Vision-language generation: burnish vs stock mlx-vlm vs float32 norm weights.

A random bf16 GLM-OCR-architecture model (mlx-vlm's `glm_ocr` classes, a few
tens of millions of parameters, no end-of-sequence token so every run
generates the full length) reads one image and generates greedily, three
ways in one process, interleaved:

* stock mlx-vlm:    `mlx_vlm.load` + `mlx_vlm.stream_generate`
* burnish:          `burnish.from_pretrained` + `burnish.stream_generate`
* fp32 norm weights (bug): stock with every norm weight cast to float32, which
                    turns the bf16 activations, KV cache and logits float32
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import burnish  # noqa: F401  (first)
import mlx.core as mx

from common import ROOT, median, n_params, weights_nbytes

NAME = "vlm"
TEXT = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                             "partial_rotary_factor": 1.0, "rope_theta": 10000})
VISION = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4)
IMAGE_SIZE = 64  # 8x8 patches of 8 pixels -> 16 image tokens
PROMPT = "what is written here?"
PREFILL_REPS = 7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vlm")
    group.add_argument("--vlm-tokens", type=int, default=1024,
                       help="tokens generated per run (default 1024)")
    group.add_argument("--vlm-reps", type=int, default=1,
                       help="interleaved runs per variant (median reported)")


def _vlm_tiny():
    spec = importlib.util.spec_from_file_location("burnish_bench_vlm_tiny",
                                                  ROOT / "tests" / "vlm_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants(path: Path):
    from mlx.utils import tree_flatten
    from mlx_vlm import load

    from burnish.loading import from_pretrained
    from burnish.precision import norm_parameter_paths

    stock = load(str(path))
    ours = from_pretrained(path)
    buggy = load(str(path))
    norms = norm_parameter_paths(buggy[0])
    buggy[0].load_weights([(k, v.astype(mx.float32))
                           for k, v in tree_flatten(buggy[0].parameters()) if k in norms],
                          strict=False)
    for model, _ in (stock, ours, buggy):
        mx.eval(model.parameters())
    return {"stock mlx-vlm": stock, "burnish": ours, "fp32 norm weights (bug)": buggy}


def _stream(name, model, processor, image, tokens):
    """A greedy generation stream of `tokens` tokens (nothing runs until next())."""
    if name == "burnish":
        from burnish.generation import stream_generate

        return stream_generate(model, processor, PROMPT, images=[image],
                               max_new_tokens=tokens)
    from mlx_vlm import stream_generate as vlm_stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    processor.tokenizer.stopping_criteria.reset(model.config.eos_token_id)
    prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
    return vlm_stream_generate(model, processor, prompt, image=[image],
                               max_tokens=tokens, temperature=0.0)


def _timed(models, image, tokens, rounds_offset=0):
    """Speed, all variants at once: their streams advance in turn, one step
    each per round (the first variant rotating), and each step is timed to
    completion. Load from other processes then hits every variant alike."""
    from mlx_vlm.generate import generation_stream

    names = list(models)
    streams = {n: _stream(n, *models[n], image, tokens) for n in names}
    steps = {n: [] for n in names}
    last = {}
    active, r = list(names), rounds_offset
    while active:
        k = r % len(active)
        for name in active[k:] + active[:k]:
            start = time.perf_counter()
            chunk = next(streams[name], None)
            # mlx-vlm computes the next token ahead on its own stream
            mx.synchronize(generation_stream)
            if chunk is None:
                active.remove(name)
                continue
            steps[name].append((time.perf_counter() - start, chunk.generation_tokens))
            last[name] = chunk
        r += 1
    out = {}
    for name in names:
        # A stream step may cover several tokens (burnish holds back chunks
        # with no text), so decode speed counts the tokens after the first
        # step over the time after it. Prefill speed is mlx-vlm's own
        # measure (prompt to first token), taken inside the first step.
        (_, n0), rest = steps[name][0], steps[name][1:]
        done = last[name].generation_tokens
        out[name] = {"prompt_tokens": last[name].prompt_tokens,
                     "generation_tokens": done,
                     "prefill_tps": last[name].prompt_tps,
                     "decode_tps": (done - n0) / sum(t for t, _ in rest) if rest else 0.0}
    return out


def _memory(name, model, processor, image, tokens):
    """Peak memory of one run on its own (MLX peak allocation above the
    memory in use before it), with the text it generated."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    text = "".join(c.text for c in _stream(name, model, processor, image, tokens))
    return {"peak_run_bytes": mx.get_peak_memory() - base, "text": text}


def run(args) -> dict:
    tokens = getattr(args, "vlm_tokens", 1024)
    if getattr(args, "quick", False):
        tokens = min(tokens, 128)
    reps = getattr(args, "vlm_reps", 1)
    tiny = _vlm_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.build(Path(tmp) / "glm_ocr", "glm_ocr", dtype=mx.bfloat16,
                          text=TEXT, vision=VISION, eos=False, image_size=IMAGE_SIZE)
        image = tiny.image(size=(96, 80))
        models = _variants(path)
        names = list(models)
        _timed(models, image, 8)  # warm up
        runs = {name: [] for name in names}
        for rep in range(reps):
            for name, stats in _timed(models, image, tokens, rep).items():
                runs[name].append(stats)
        # Prefill is one short step per run: take the median of several.
        prefill = {name: [] for name in names}
        for rep in range(PREFILL_REPS):
            for name, stats in _timed(models, image, 1, rep).items():
                prefill[name].append(stats["prefill_tps"])
        for name in names:
            runs[name][0].update(_memory(name, *models[name], image, tokens))
        params = n_params(models["burnish"][0])
        facts = {}
        for name in names:
            model = models[name][0]
            facts[name] = {"weights_bytes": weights_nbytes(model),
                           "norm_dtype": str(model.language_model.model.norm(
                               mx.ones((1, TEXT["hidden_size"]), mx.bfloat16)).dtype)}
        prompt_tokens = runs["burnish"][0]["prompt_tokens"]

    stock = "stock mlx-vlm"

    def med(name, key):
        return median([r[key] for r in runs[name]])

    def memory(name):
        return facts[name]["weights_bytes"] + runs[name][0]["peak_run_bytes"]

    rows, data = [], {}
    for name in names:
        decode, mem = med(name, "decode_tps"), memory(name)
        pre = median(prefill[name])
        same = runs[name][0]["text"] == runs[stock][0]["text"]
        data[name] = {
            "prefill_tps": pre, "decode_tps": decode, "peak_bytes": mem,
            "prefill_ratio": pre / median(prefill[stock]),
            "prefill_runs": prefill[name],
            "decode_ratio": decode / med(stock, "decode_tps"),
            "memory_ratio": mem / memory(stock),
            "norm_output_dtype": facts[name]["norm_dtype"].split(".")[-1],
            "same_text_as_stock": same,
            "runs": [{k: v for k, v in r.items() if k != "text"} for r in runs[name]],
        }
        d = data[name]
        rows.append([name, f"{pre:.1f}", f"{d['prefill_ratio']:.2f}x",
                     f"{decode:.1f}", f"{d['decode_ratio']:.2f}x",
                     f"{mem / 1e6:.0f}", f"{d['memory_ratio']:.2f}x",
                     d["norm_output_dtype"], "yes" if same else "no"])
    return {
        "name": NAME,
        "title": "VLM generation (GLM-OCR architecture, bf16): burnish vs stock mlx-vlm",
        "description": (
            f"Random bf16 GLM-OCR-architecture model (mlx-vlm glm_ocr), "
            f"{params / 1e6:.1f}M parameters (text: hidden {TEXT['hidden_size']}, "
            f"{TEXT['num_hidden_layers']} layers; vision: hidden {VISION['hidden_size']}, "
            f"{VISION['depth']} blocks); one {IMAGE_SIZE}x{IMAGE_SIZE} image, "
            f"{prompt_tokens}-token prompt, {tokens} greedy tokens. Speed: the three "
            "generations advance in turn, one token each, every step timed to completion "
            f"(median of {reps} such run(s)). Prefill (vision tower included) as mlx-vlm "
            f"measures it, median of {PREFILL_REPS} interleaved one-token runs. Peak memory: weights + MLX peak allocation in a separate run of "
            "each. 'norm output': the dtype the final norm returns for bf16 input."),
        "columns": ["model", "prefill tok/s", "vs stock", "decode tok/s", "vs stock",
                    "peak MB", "vs stock", "norm output", "same text as stock"],
        "rows": rows,
        "data": data,
        "config": {"text": TEXT, "vision": VISION, "image_size": IMAGE_SIZE,
                   "tokens": tokens, "reps": reps, "params": params,
                   "prompt_tokens": prompt_tokens},
    }


if __name__ == "__main__":
    from common import main

    main(__doc__, add_arguments, run)  # --quick: at most 128 tokens
