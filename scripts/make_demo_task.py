"""Write the synthetic task that `burnish demo` fine-tunes the bundled model on.

    .venv/bin/python scripts/make_demo_task.py     # writes src/burnish/assets/demo_task/

The task: say whether a colour is "warm" or "cool" ("Is red warm or cool?" ->
"It is warm."), asked in eight phrasings. The bundled model never saw the
question or the answer format (0% exact match before fine-tuning). Training
rows cover every colour and every phrasing, but the 24 test prompts are
(phrasing, colour) pairs that training never shows, so the demo measures
answers to prompts the model has not been trained on.

History (kept honest): a first version asked "What is the capital of X?" ->
"The capital of X is Port X." for unseen names X. The bundled model cannot
copy names yet (see build_tiny_model.py), so LoRA stayed at 0%. On this task
LoRA (r=16, alpha=128, lr 1e-3, 300 steps of 8, float32 compute) reached 54%
in ~50 s on 2 CPU cores (2026-12-04), full fine-tuning 71%: the model learns
the answer format at once but separates the colours only slowly, because in
pretraining colours are interchangeable. A longer-pretrained base model is
the fix (see the README).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "burnish" / "assets" / "demo_task"
SEED = 7
N_TEST = 24

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "orange",
           "purple", "grey", "gold"]
WARM = {"red", "yellow", "pink", "orange", "gold"}
TEMPLATES = [
    "Is {c} a warm or a cool colour?", "Is {c} warm or cool?",
    "Would you call {c} warm or cool?", "Warm or cool: {c}?",
    "Tell me if {c} is warm or cool.", "Is the colour {c} warm or cool?",
    "Do people say {c} is warm or cool?", "Is {c} a cool or a warm colour?",
]


def answer(colour: str) -> str:
    return "It is warm." if colour in WARM else "It is cool."


def row(template: str, colour: str) -> dict:
    return {"messages": [{"role": "user", "content": template.format(c=colour)},
                         {"role": "assistant", "content": answer(colour)}]}


def make_rows() -> tuple[list[dict], list[dict]]:
    pairs = [(t, c) for t in TEMPLATES for c in COLOURS]
    random.Random(SEED).shuffle(pairs)
    test, train = pairs[:N_TEST], pairs[N_TEST:]
    return [row(*p) for p in train], [row(*p) for p in test]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    train, test = make_rows()
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {OUT}")


if __name__ == "__main__":
    main()
