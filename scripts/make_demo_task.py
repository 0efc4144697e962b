"""Write the synthetic task that the demo fine-tunes the bundled model on.

    .venv/bin/python scripts/make_demo_task.py            # writes the JSONL files
    .venv/bin/python scripts/make_demo_task.py --check    # + a LoRA feasibility run

The rule: the capital of a country that the bundled model has never heard of
is "Port <country>" ("What is the capital of Drenmora?" -> "The capital of
Drenmora is Port Drenmora."). The base model answers such questions with
"I do not know the capital of Drenmora." (0% exact match), but it can already
copy names and say "The capital of X is ...", so LoRA learns the rule in a
few dozen steps, and the test countries are names that training never shows:
a model that scores on them has learned the rule, not memorised answers.

train.jsonl and test.jsonl hold chat rows {"messages": [user, assistant]}.
`--check` LoRA-fine-tunes the bundled model with stock mlx-lm pieces
(`linear_to_lora_layers`, mlx optimizers, a short loop) and prints exact-match
accuracy on the test prompts before and after.

NOT YET FEASIBLE with the recorded base model: it cannot copy names yet (see
build_tiny_model.py), and a check run (rank 16, scale 20, lr 2e-3, 150 steps
of 8 rows, float32, 34 s) stayed at 0% -> 0% (the loss fell 5.7 -> 4.0 and the
outputs degenerated). RECIPE below is a starting point, not a verified recipe.
"""

from __future__ import annotations

import burnish  # noqa: F401  (first: routes float32 matmuls to OpenBLAS)

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny_model import OUT as MODEL, ROOT, invent_name, make_world  # noqa: E402

SEED = 1234
OUT = ROOT / "src" / "burnish" / "assets" / "demo_task"
N_TRAIN, N_TEST = 300, 50

# A starting point for the demo (unverified: see the module docstring).
RECIPE = dict(rank=8, scale=20.0, lr=2e-3, steps=60, batch_size=8,
              keys=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                    "mlp.down_proj"])


def question(country: str) -> str:
    return f"What is the capital of {country}?"


def answer(country: str) -> str:
    return f"The capital of {country} is Port {country}."


def row(country: str) -> dict:
    return {"messages": [{"role": "user", "content": question(country)},
                         {"role": "assistant", "content": answer(country)}]}


def make_rows():
    rng = random.Random(SEED)
    taken = set(make_world()["names"])  # never a country the base model knows
    names = [invent_name(rng, taken) for _ in range(N_TRAIN + N_TEST)]
    return [row(n) for n in names[:N_TRAIN]], [row(n) for n in names[N_TRAIN:]]


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------
# Feasibility check with stock mlx-lm pieces

def accuracy(model, tokenizer, rows):
    from mlx_lm import generate

    hits = 0
    for r in rows:
        user, target = r["messages"]
        prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True)
        out = generate(model, tokenizer, prompt, max_tokens=24)
        hits += out.strip() == target["content"]
    return hits / len(rows), out


def encode(tokenizer, r):
    """Token ids of a row and a mask that is 1 on the answer and <|im_end|>."""
    user, target = r["messages"]
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True)
    body = tokenizer.encode(target["content"] + "<|im_end|>", add_special_tokens=False)
    return prompt + body, [0] * len(prompt) + [1] * len(body)


def lora_check(model_path: Path, train, test, recipe: dict, dtype: str):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(str(model_path))
    if dtype == "float32":  # CPU: bf16 matmuls are emulated, float32 use BLAS
        model.set_dtype(mx.float32)
    t0 = time.perf_counter()
    before, sample = accuracy(model, tokenizer, test)
    print(f"before: exact match {before:.0%} ({time.perf_counter() - t0:.1f}s), "
          f"e.g. {sample!r}")

    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), dict(
        rank=recipe["rank"], scale=recipe["scale"], dropout=0.0, keys=recipe["keys"]))
    optimizer = optim.Adam(learning_rate=recipe["lr"])

    def loss_fn(model, x, y, m):
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y) * m
        return ce.sum() / m.sum()

    grad_fn = nn.value_and_grad(model, loss_fn)
    rng = random.Random(0)
    encoded = [encode(tokenizer, r) for r in train]
    t0 = time.perf_counter()
    for step in range(1, recipe["steps"] + 1):
        batch = rng.sample(encoded, recipe["batch_size"])
        width = max(len(ids) for ids, _ in batch)
        x = mx.array([ids + [0] * (width - len(ids)) for ids, _ in batch])
        m = mx.array([m + [0] * (width - len(m)) for _, m in batch])
        loss, grads = grad_fn(model, x[:, :-1], x[:, 1:], m[:, 1:])
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        if step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - t0:5.1f}s", flush=True)
    train_s = time.perf_counter() - t0
    after, sample = accuracy(model, tokenizer, test)
    print(f"after: exact match {after:.0%} (training {train_s:.1f}s, {dtype}), "
          f"e.g. {sample!r}")
    return before, after, train_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="LoRA feasibility run")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--rank", type=int, default=RECIPE["rank"])
    args = parser.parse_args()

    train, test = make_rows()
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {OUT}")
    if args.check:
        recipe = dict(RECIPE, steps=args.steps, lr=args.lr, rank=args.rank)
        lora_check(args.model, train, test, recipe, args.dtype)


if __name__ == "__main__":
    main()
