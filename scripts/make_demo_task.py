"""Write the synthetic task that `burnish demo` fine-tunes the bundled model on.

    .venv/bin/python scripts/make_demo_task.py     # writes src/burnish/assets/demo_task/

The task: name the skill a request needs, in the words of the model's own
self-description ("I know some facts about a small invented world, and I can
add, subtract, count and repeat words"):

    "What is 3 plus 4?"            -> "I can add."
    "What is 9 minus 2?"           -> "I can subtract."
    "Count from 2 to 6."           -> "I can count."
    "Repeat after me: brel dax"    -> "I can repeat words."
    "Where does Quuzhee live?"     -> "I know some facts."

The requests are drawn from the same generators that wrote the bundled
model's pretraining data (scripts/build_tiny_model.py), so the model already
tells them apart; what it has never seen is being asked to name the skill
instead of using it. Before fine-tuning it answers the question itself (0%
exact match). The 40 test requests are new instances (other numbers, names
and made-up words) that no training row contains.

History (kept honest): earlier versions asked "What is the capital of X?" ->
"The capital of X is Port X." (LoRA stayed at 0%: the base model cannot copy
names) and "Is red warm or cool?" -> "It is warm." (54%). Both answers were
spelled with tokens the base model never produced ("w" "ar" "m"), so LoRA had
to learn spelling and the task at once; this task answers with words the
model already uses. Measured with the demo recipe (r=16, alpha=32, lr 1e-3,
400 steps of 8, float32 compute) on 2 CPU cores, 2026-12-04: 0% -> 100%,
100%, 97.5% for training seeds 0, 1, 2.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import build_tiny_model as world_script  # noqa: E402  (the pretraining data's generators)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "burnish" / "assets" / "demo_task"
SEED = 7
N_TRAIN, N_TEST = 160, 40


def plus(rng, world):
    a, b = (rng.randint(0, world_script.NUMBER_MAX) for _ in range(2))
    return f"What is {a} plus {b}?"


def minus(rng, world):
    b, a = sorted(rng.randint(0, world_script.NUMBER_MAX) for _ in range(2))
    return f"What is {a} minus {b}?"


def count(rng, world):
    return world_script.qa_count(rng, world)[0]


def repeat(rng, world):
    return world_script.qa_repeat(rng, world)[0]


def facts(rng, world):
    ask = rng.choice([world_script.qa_capital, world_script.qa_city_country,
                      world_script.qa_person])
    return ask(rng, world)[0]


SKILLS = [(plus, "I can add."), (minus, "I can subtract."), (count, "I can count."),
          (repeat, "I can repeat words."), (facts, "I know some facts.")]


def make_rows(rng: random.Random, world: dict, n: int, seen: set[str]) -> list[dict]:
    """n rows, the skills in turn; a request already in `seen` is drawn again."""
    rows = []
    while len(rows) < n:
        request, answer = SKILLS[len(rows) % len(SKILLS)]
        question = request(rng, world)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng, world, seen = random.Random(SEED), world_script.make_world(), set()
    test = make_rows(rng, world, N_TEST, seen)  # first, so training never repeats one
    train = make_rows(rng, world, N_TRAIN, seen)
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {OUT}")


if __name__ == "__main__":
    main()
