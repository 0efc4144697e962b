"""Training throughput: burnish's Trainer vs stock `mlx_lm.tuner.trainer.train`.

Same random bf16 Llama, same generated chat data (mixed lengths), same
tokens and loss masks (both get mlx-lm's own `ChatDataset(mask_prompt=True)`
tokenization), same LoRA layers (mlx-lm's `linear_to_lora_layers` on every
linear layer of every block, same rank/scale and the same random init), same
optimizer (Adam, constant learning rate, no clipping), same batch size and
number of steps (one epoch: every example once), all in one process with
interleaved repetitions.

Measured per run: wall time of the whole `train()` call (Trainer construction
included for burnish), process CPU time, MLX peak memory (weights included:
reset before the run, read after), and afterwards the final training loss of
the trained model on all training examples, computed by one shared function
(token-weighted float32 cross-entropy over the trained tokens) for both.

"Trained tokens" are the loss-masked target tokens: the assistant reply and
its end-of-turn tokens. mlx-lm's mask also counts one position past the end
of each sequence (a padding target: an off-by-one in `default_loss`); it is
not counted here, for either trainer.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import burnish  # noqa: F401  (first: BLAS routing)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from burnish.backend import device_info
from burnish.compute import resolve_compute_dtype
from common import build_model, median, n_params

NAME = "train"

SIZES = {
    # tens of millions of parameters, lengths 32..1024 (the setting)
    "full": dict(model=dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408,
                            num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                            max_position_embeddings=2048),
                 examples=32, min_len=32, max_len=1024, batch=4, reps=3),
    # tens of millions of parameters on a CPU: ~12 min for `--train-modes lora`
    "large": dict(model=dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1408,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=16384,
                             max_position_embeddings=2048),
                  examples=6, min_len=32, max_len=1024, batch=2, reps=1),
    # over ten million parameters and lengths 32..1024 in well under an hour on
    # a 2-core CPU, where bf16 matmuls are emulated (the default there)
    "medium": dict(model=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=16384,
                              max_position_embeddings=2048),
                   examples=6, min_len=32, max_len=1024, batch=2, reps=1),
    # a few minutes on a 2-core CPU
    "quick": dict(model=dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                             max_position_embeddings=1024),
                  examples=8, min_len=32, max_len=256, batch=2, reps=3),
}
LORA = dict(rank=8, scale=2.0, dropout=0.0)
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LR = {"lora": 1e-3, "qlora": 1e-3, "full": 1e-4}
QUANT = dict(group_size=64, bits=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("train")
    group.add_argument("--train-size", choices=sorted(SIZES), default=None,
                       help="model/data size (default: quick with --quick, else full on a "
                            "GPU and medium on a CPU)")
    group.add_argument("--train-reps", type=int, default=None)
    group.add_argument("--train-modes", nargs="*", default=["lora", "qlora", "full"])


# --- data ---------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog what is two plus three five hello "
         "world this tiny model for tests user assistant system capital of zorbia "
         "quellton numbers letters and a b c d e f g 0 1 2 3 4 5 6 7 8 9").split()


def make_chats(tokenizer, n, min_len, max_len, seed=0) -> list:
    """`n` chats whose token counts spread evenly over [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    targets = np.linspace(min_len, max_len, n).astype(int)
    rng.shuffle(targets)
    hf = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer
    cost = {w: len(hf.encode(" " + w, add_special_tokens=False)) for w in WORDS}
    overhead = len(hf.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        tokenize=True)) - 2
    chats = []
    for total in targets:
        budget = max(int(total) - overhead, 4)
        prompt_budget = max(2, int(budget * rng.uniform(0.2, 0.6)))
        parts = []
        for b in (prompt_budget, budget - prompt_budget):
            words, used = [], 0
            while used < b:
                w = WORDS[rng.integers(len(WORDS))]
                words.append(w)
                used += cost[w]
            parts.append(" ".join(words))
        chats.append({"messages": [{"role": "user", "content": parts[0]},
                                   {"role": "assistant", "content": parts[1]}]})
    return chats


def tokenize(chats, tokenizer):
    """mlx-lm's own dataset classes: (tokens, prompt offset) per chat."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

    data = CacheDataset(ChatDataset(chats, tokenizer, mask_prompt=True))
    return data, [data[i] for i in range(len(data))]


def burnish_examples(items):
    from burnish.data import Example

    # the targets mlx-lm trains, minus its padding target past the end
    return [Example(list(t), [0] * off + [1] * (len(t) - off)) for t, off in items]


# --- models -------------------------------------------------------------------

def _quantize(model):
    nn.quantize(model, class_predicate=lambda p, m: isinstance(m, nn.Linear)
                and not p.endswith("lm_head"), **QUANT)


def stock_model(path, mode):
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(path))
    if mode == "qlora":
        _quantize(model)
    if mode == "full":
        model.unfreeze()
    else:
        model.freeze()
        mx.random.seed(1)
        linear_to_lora_layers(model, len(model.layers), {**LORA, "keys": LORA_KEYS})
    mx.eval(model.parameters())
    return model, tokenizer


def burnish_model(path, mode):
    from burnish.loading import from_pretrained
    from burnish.peft import get_peft_model

    model, tokenizer = from_pretrained(path, load_in_4bit=mode == "qlora",
                                       full_finetuning=mode == "full")
    if mode != "full":
        # r / lora_alpha give mlx-lm's scale; random_state seeds lora_a alike
        get_peft_model(model, r=LORA["rank"], lora_alpha=LORA["scale"] * LORA["rank"],
                       target_modules=[k.split(".")[-1] for k in LORA_KEYS], random_state=1)
    mx.eval(model.parameters())
    return model, tokenizer


# --- runs ---------------------------------------------------------------------

def _measure(fn):
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    mx.synchronize()
    return out, time.perf_counter() - t0, time.process_time() - c0, mx.get_peak_memory()


def run_stock(path, mode, dataset, steps, batch, tmp):
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train

    model, _ = stock_model(path, mode)
    args = TrainingArgs(batch_size=batch, iters=steps, steps_per_report=steps,
                        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=2048,
                        adapter_file=str(Path(tmp) / "stock_adapters.safetensors"))
    opt = optim.Adam(learning_rate=LR[mode])
    losses = []

    class Report:
        def on_train_loss_report(self, info):
            losses.append(info["train_loss"])

        def on_val_loss_report(self, info):
            pass

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # its progress UI
        _, wall, cpu, peak = _measure(lambda: train(model, opt, dataset, args=args,
                                                    training_callback=Report()))
    return model, {"wall": wall, "cpu": cpu, "peak": peak, "own_loss": losses[-1]}


def run_burnish(path, mode, examples, steps, batch, tmp, **settings):
    from burnish.trainer import Trainer, TrainingConfig

    model, tokenizer = burnish_model(path, mode)
    config = TrainingConfig(output_dir=str(Path(tmp) / "burnish"),
                            per_device_train_batch_size=batch, max_steps=steps,
                            learning_rate=LR[mode], lr_scheduler_type="constant",
                            optim="adam", max_grad_norm=None, logging_steps=steps, seed=1,
                            **settings)

    def go():
        return Trainer(model, tokenizer, examples, config=config, progress=False).train()

    metrics, wall, cpu, peak = _measure(go)
    return model, {"wall": wall, "cpu": cpu, "peak": peak, "own_loss": metrics["train_loss"]}


def final_loss(model, examples) -> float:
    """Token-weighted float32 CE over the trained tokens (same code for both)."""
    from burnish.data import make_batch
    from burnish.losses import loss_and_count

    model.eval()
    total, count = 0.0, 0
    for i in range(len(examples)):
        batch = make_batch(examples, [i])
        loss, _ = loss_and_count(model, batch, training=False)
        total += loss.item()
        count += batch.n_tokens
    return total / count


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    info = device_info()
    size = getattr(args, "train_size", None) or (
        "quick" if quick else "medium" if mx.default_device() == mx.cpu else "full")
    spec = SIZES[size]
    reps = getattr(args, "train_reps", None) or spec["reps"]
    modes = getattr(args, "train_modes", None) or ["lora", "qlora", "full"]
    batch = spec["batch"]
    steps = spec["examples"] // batch
    variants = {"stock mlx-lm": ("stock", {}), "burnish": ("burnish", {}),
                "burnish, compute_dtype=None": ("burnish", {"compute_dtype": None}),
                "burnish, gradient_checkpointing": ("burnish", {"gradient_checkpointing": True})}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "llama", "llama", dtype=mx.bfloat16, **spec["model"])
        model, tokenizer = stock_model(path, "full")
        params = n_params(model)
        del model
        chats = make_chats(tokenizer, spec["examples"], spec["min_len"], spec["max_len"])
        dataset, items = tokenize(chats, tokenizer)
        examples = burnish_examples(items)
        lengths = [len(t) for t, _ in items]
        trained = sum(len(t) - off for t, off in items)
        # warm up (kernel builds for mlx-lm's compiled step, imports)
        warm = burnish_examples(items[:batch])
        for mode in modes:
            run_stock(path, mode, dataset, 1, batch, tmp)
            for _, kw in variants.values():
                run_burnish(path, mode, warm, 1, batch, tmp, **kw)
        runs = {(m, v): [] for m in modes for v in variants}
        losses = {}
        for rep in range(reps):
            for mode in modes:
                names = list(variants)
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    kind, kw = variants[name]
                    if kind == "stock":
                        model, r = run_stock(path, mode, dataset, steps, batch, tmp)
                    else:
                        model, r = run_burnish(path, mode, examples, steps, batch, tmp, **kw)
                    if rep == 0:
                        losses[(mode, name)] = final_loss(model, examples)
                    del model
                    runs[(mode, name)].append(r)
                    print(f"  {mode:5s} {name:24s} rep {rep}: {trained / r['wall']:7.1f} tok/s "
                          f"{r['peak'] / 1e6:7.0f} MB loss {r['own_loss']:.4f}", flush=True)
    rows, data = [], {}
    for mode in modes:
        stock = runs[(mode, "stock mlx-lm")]
        for name in variants:
            rs = runs[(mode, name)]
            tps = median([trained / r["wall"] for r in rs])
            ratio = median([s["wall"] / r["wall"] for r, s in zip(rs, stock)])
            cpu_ratio = median([s["cpu"] / r["cpu"] for r, s in zip(rs, stock)])
            peak = median([r["peak"] for r in rs])
            mem_ratio = peak / median([s["peak"] for s in stock])
            loss = losses[(mode, name)]
            loss_ratio = loss / losses[(mode, "stock mlx-lm")]
            data[f"{mode}/{name}"] = {"tokens_per_sec": tps, "speed_ratio_wall": ratio,
                                      "speed_ratio_cpu": cpu_ratio, "peak_bytes": peak,
                                      "memory_ratio": mem_ratio, "final_loss": loss,
                                      "loss_ratio": loss_ratio, "runs": rs}
            rows.append([mode, name, f"{tps:.1f}", f"{ratio:.2f}x", f"{cpu_ratio:.2f}x",
                         f"{peak / 1e6:.0f}", f"{mem_ratio:.2f}x", f"{loss:.4f}",
                         f"{loss_ratio:.3f}"])
    cfg = spec["model"]
    auto = ("float32 compute here: weights cast to float32 while training, back to bf16 "
            "after" if resolve_compute_dtype("auto") is not None else "the model's dtypes here")
    return {
        "name": f"{NAME}-{size}",  # one result per size in results.json
        "title": f"Training ({size}): burnish Trainer vs mlx-lm's trainer (bf16 model)",
        "description": (
            f"Random bf16 Llama, {params / 1e6:.1f}M parameters (hidden {cfg['hidden_size']}, "
            f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}); {len(items)} "
            f"generated chats of {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} tokens, "
            f"{trained} trained); batch {batch}, {steps} steps (one epoch), Adam, constant lr "
            f"(LoRA/QLoRA {LR['lora']:g}, full {LR['full']:g}), no clipping; LoRA rank "
            f"{LORA['rank']} scale {LORA['scale']} on all 7 linear layers of every block; "
            f"QLoRA: 4-bit affine (group 64) linear layers. Median of {reps} interleaved "
            "repetition(s). tok/s = trained tokens / wall time of the whole run. Speed ratios "
            "(burnish / stock, higher is better) are medians of per-repetition ratios, in wall "
            "time and in CPU time of this process. Peak = MLX peak memory during the run, "
            "weights included. Final loss: token-weighted float32 cross-entropy of the "
            "trained model on all training examples (the same function for both). burnish "
            "runs its defaults (length-sorted batches, output head on trained positions "
            "only, chunked float32 loss, eager step on CPU, compute_dtype='auto': "
            f"{auto}); 'compute_dtype=None' trains in the model's bf16, "
            "the path every GPU takes; 'gradient_checkpointing' adds "
            "TrainingConfig(gradient_checkpointing=True) to the defaults (each block's "
            f"activations recomputed in the backward pass). BLAS: {info['blas']}."),
        "columns": ["mode", "trainer", "trained tok/s", "speed vs stock (wall)",
                    "speed vs stock (CPU)", "peak MB", "memory vs stock", "final loss",
                    "loss vs stock"],
        "rows": rows,
        "data": data,
        "config": {"size": size, **spec, "params": params, "lora": LORA, "lr": LR,
                   "lengths": lengths, "trained_tokens": trained},
    }


if __name__ == "__main__":
    from common import main

    main(__doc__, add_arguments, run)
