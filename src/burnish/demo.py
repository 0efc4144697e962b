"""`burnish demo` / `make demo`: fine-tune the bundled tiny model on a new skill.

The bundled model (`assets/tiny-chat`) was pretrained from scratch on a small
invented world (`scripts/build_tiny_model.py`). The demo task
(`assets/demo_task`, written by `scripts/make_demo_task.py`) asks for
something it was never taught: to name the skill a request needs ("What is 3
plus 4?" -> "I can add.") instead of answering it. The demo measures
exact-match accuracy on held-out prompts, LoRA-fine-tunes, measures again, and
saves adapters, a merged model, metrics and a loss plot.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = ASSETS / "tiny-chat"
DEMO_TASK = ASSETS / "demo_task"
SHOWN = 5  # held-out prompts printed before and after (one per skill)


@dataclass
class DemoRecipe:
    """LoRA settings for the demo task (see scripts/make_demo_task.py): about
    40 s of training on 2 CPU cores; 0% -> 97.5-100% over training seeds 0-2."""

    r: int = 16
    lora_alpha: float = 32
    learning_rate: float = 1e-3
    max_steps: int = 400
    batch_size: int = 8
    warmup_steps: int = 10
    max_new_tokens: int = 8


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_prompt(row: dict) -> tuple[list[dict], str]:
    """Chat messages up to the last assistant turn, and that turn's text."""
    messages = row["messages"]
    return messages[:-1], messages[-1]["content"].strip()


def answers(model, tokenizer, rows, max_new_tokens) -> list[str]:
    from .generation import generate

    prompts = [split_prompt(r)[0] for r in rows]
    return [t.strip() for t in generate(model, tokenizer, prompts,
                                        max_new_tokens=max_new_tokens)]


def accuracy(rows, predicted) -> float:
    hits = sum(p == split_prompt(r)[1] for r, p in zip(rows, predicted))
    return hits / max(len(rows), 1)


def show(rows, predicted, title) -> None:
    print(f"\n{title}")
    for row, text in list(zip(rows, predicted))[:SHOWN]:
        question = split_prompt(row)[0][-1]["content"]
        expected = split_prompt(row)[1]
        mark = "ok " if text == expected else "   "
        print(f"  {mark} Q: {question}\n      A: {text!r}   (expected {expected!r})")


def run_demo(args) -> int:
    from .backend import device_info
    from .export import save_adapters, save_merged
    from .loading import FastModel
    from .trainer import Trainer, TrainingConfig

    recipe = DemoRecipe()
    if getattr(args, "max_steps", None):
        recipe.max_steps = args.max_steps
    out = Path(args.output_dir)
    info = device_info()
    print(f"burnish demo | MLX {info['mlx_version']} on {info['device']} | "
          f"BLAS: {info['blas']}")
    model, tokenizer = FastModel.from_pretrained(TINY_MODEL)
    print(f"loaded the bundled tiny model ({TINY_MODEL})")
    print("task: name the skill a request needs, e.g. 'What is 3 plus 4?' -> "
          "'I can add.' (the model has only ever answered such requests)")
    train_rows = read_jsonl(DEMO_TASK / "train.jsonl")
    test_rows = read_jsonl(DEMO_TASK / "test.jsonl")

    before = answers(model, tokenizer, test_rows, recipe.max_new_tokens)
    acc_before = accuracy(test_rows, before)
    show(test_rows, before, f"before fine-tuning: exact match {acc_before:.0%} "
                            f"on {len(test_rows)} held-out prompts")

    model = FastModel.get_peft_model(model, r=recipe.r, lora_alpha=recipe.lora_alpha)
    config = TrainingConfig(
        output_dir=str(out), per_device_train_batch_size=recipe.batch_size,
        max_steps=recipe.max_steps, learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_steps, lr_scheduler_type="cosine",
        logging_steps=10, seed=0)
    print(f"\nLoRA fine-tuning on {len(train_rows)} examples "
          f"(r={recipe.r}, {recipe.max_steps} steps, lr {recipe.learning_rate})")
    tic = time.perf_counter()
    metrics = Trainer(model, tokenizer, train_rows, config=config).train()
    seconds = time.perf_counter() - tic

    after = answers(model, tokenizer, test_rows, recipe.max_new_tokens)
    acc_after = accuracy(test_rows, after)
    show(test_rows, after, f"after fine-tuning: exact match {acc_after:.0%}")

    adapters = save_adapters(model, out / "adapters")
    merged = save_merged(model, tokenizer, out / "merged")
    summary = {"accuracy_before": acc_before, "accuracy_after": acc_after,
               "train_seconds": seconds, **metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nexact match: {acc_before:.0%} -> {acc_after:.0%} "
          f"(final train loss {metrics['train_loss']:.3f}, {seconds:.0f} s)")
    print(f"saved under {out.resolve()}/:")
    print(f"  adapters  {adapters.name}/   (mlx_lm.load(base, adapter_path=...))")
    print(f"  merged    {merged.name}/     (a Hugging Face folder, bf16)")
    print("  metrics   metrics.jsonl, summary.json")
    print("  plot      loss.png")
    return 0
