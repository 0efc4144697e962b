"""Pretrain the bundled tiny chat model from scratch (reproducible).

    .venv/bin/python scripts/build_tiny_model.py            # full run, writes the assets
    .venv/bin/python scripts/build_tiny_model.py --steps 50 --out /tmp/tiny  # quick try

The training text is written here, procedurally: single- and two-turn ChatML
conversations about a small invented world (countries and their capitals,
people, where they live, the colour they like), arithmetic with
numbers up to 10, counting, repeating and spelling made-up words, and a little
small talk. Questions about names that are not in the world get "I do not
know ..." answers, meant to teach the model to copy arbitrary names (the
recorded run is too short for that; see below).

The model is mlx-lm's `llama` architecture (4 layers, width 192, 4 heads, MLP
512, vocab 1024: 2.16M parameters), trained in float32 (fast on CPU once `import burnish` has routed
matmuls to OpenBLAS) and saved in bfloat16 as a Hugging Face folder with a
byte-level BPE tokenizer trained here and a ChatML chat template.

Recorded run (seed 0, defaults: 2400 steps of 16 conversations, lr 4e-3,
answer-only loss; 1922 s wall on the shared 2-core machine, ~0.4-1 s/step):
    final training loss (mean of the last 50 steps): 1.4667
    held-out loss: 1.8012 (float32), 1.8015 (after the cast to bf16)
    2.16M parameters (vocab 1024), model.safetensors 4.3 MB.
The model answers in the forms of its training data and gets the small talk
right, but it is UNDER-TRAINED: it does not yet copy names or words and its
arithmetic is unreliable (e.g. "What is 3 plus 4?" -> "3 plus 3 is 7.").
"""

from __future__ import annotations

import burnish  # noqa: F401  (first: routes float32 matmuls to OpenBLAS)

import argparse
import json
import random
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

SEED = 0
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "burnish" / "assets" / "tiny-chat"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=192,
    num_hidden_layers=4,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1024

# --------------------------------------------------------------------------
# The invented world

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p",
          "pr", "qu", "r", "s", "sh", "st", "t", "tr", "v", "z", "zh", "w", "h"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white",
           "black", "pink", "brown", "grey", "gold"]
NUMBER_MAX = 10


def invent(rng: random.Random, syllables: int | None = None) -> str:
    """A pronounceable made-up word, lower case."""
    n = syllables or rng.choice([1, 2, 2, 3])
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(n))


def invent_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = invent(rng, rng.choice([2, 3])).capitalize()
        if name not in taken and 4 <= len(name) <= 10:
            taken.add(name)
            return name


def make_world(seed: int = SEED) -> dict:
    """The fixed facts the model memorises: 24 countries, 30 people."""
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = {invent_name(rng, taken): invent_name(rng, taken) for _ in range(24)}
    cities = list(countries.values())
    people = {}
    for _ in range(30):
        people[invent_name(rng, taken)] = dict(
            city=rng.choice(cities), colour=rng.choice(COLOURS))
    return dict(countries=countries, people=people, names=taken)


def fresh_name(rng: random.Random, world: dict) -> str:
    """A name that is not in the world."""
    return invent_name(rng, set(world["names"]))


# --------------------------------------------------------------------------
# Conversations (one user question, one assistant answer)

def qa_capital(rng, world):
    country, city = rng.choice(list(world["countries"].items()))
    q = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                    "Tell me the capital of {c}."])
    return q.format(c=country), f"The capital of {country} is {city}."


def qa_capital_unknown(rng, world):
    country = fresh_name(rng, world)
    return f"What is the capital of {country}?", f"I do not know the capital of {country}."


def qa_city_country(rng, world):
    country, city = rng.choice(list(world["countries"].items()))
    return f"Which country is {city} in?", f"{city} is in {country}."


def qa_person(rng, world):
    name, p = rng.choice(list(world["people"].items()))
    if rng.random() < 0.5:
        return f"Where does {name} live?", f"{name} lives in {p['city']}."
    return f"What colour does {name} like?", f"{name} likes {p['colour']}."


def qa_person_unknown(rng, world):
    name = fresh_name(rng, world)
    q = rng.choice(["Where does {n} live?", "What colour does {n} like?"])
    return q.format(n=name), f"I do not know {name}."


def qa_arithmetic(rng, world):
    a, b = rng.randint(0, NUMBER_MAX), rng.randint(0, NUMBER_MAX)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def qa_count(rng, world):
    a = rng.randint(0, NUMBER_MAX)
    b = a + rng.randint(2, 7)
    return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."


def qa_repeat(rng, world):
    words = " ".join(invent(rng) for _ in range(rng.randint(1, 4)))
    q = rng.choice(["Repeat after me: {w}", "Say {w}.", "Please repeat: {w}"])
    return q.format(w=words), words


def qa_small_talk(rng, world):
    return rng.choice([
        ("Hello!", "Hello! How can I help you today?"),
        ("Hi there.", "Hello! How can I help you today?"),
        ("Who are you?", "I am a tiny chat model made by burnish."),
        ("What can you do?", "I know some facts about a small invented world, "
                             "and I can add, subtract, count and repeat words."),
        ("Thank you!", "You are welcome!"),
        ("Goodbye.", "Goodbye! Have a nice day."),
    ])


TASKS = [  # (generator, weight)
    (qa_capital, 14), (qa_capital_unknown, 5), (qa_city_country, 5),
    (qa_person, 16), (qa_person_unknown, 4), (qa_arithmetic, 16), (qa_count, 8),
    (qa_repeat, 20), (qa_small_talk, 4),
]


def conversation(rng: random.Random, world: dict) -> list[dict]:
    funcs, weights = zip(*TASKS)
    messages = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        q, a = rng.choices(funcs, weights)[0](rng, world)
        messages += [dict(role="user", content=q), dict(role="assistant", content=a)]
    return messages


def render(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# --------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(world: dict, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(SEED + 1)
    texts = [render(conversation(rng, world)) for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


# --------------------------------------------------------------------------
# Data: one conversation per row (a tiny model learns to copy from the
# question much sooner without other conversations in view), rows of similar
# length batched together so that little compute goes to padding. The loss
# covers the assistant answers and their <|im_end|> only: the questions hold
# random names that no model can predict.

def encode(tokenizer, messages):
    ids, mask = [], []
    for m in messages:
        head = tokenizer.encode(f"<|im_start|>{m['role']}\n")
        body = tokenizer.encode(f"{m['content']}<|im_end|>")
        ids += head + body + tokenizer.encode("\n")
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0]
    return ids, mask


def batches(tokenizer, world, seed, batch_size, pool=16):
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    while True:
        rows = sorted((encode(tokenizer, conversation(rng, world))
                       for _ in range(batch_size * pool)), key=lambda r: len(r[0]))
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = -(-max(len(ids) for ids, _ in chunk) // 8) * 8  # few shapes to compile
            x = mx.array([ids + [pad] * (width - len(ids)) for ids, _ in chunk])
            m = mx.array([m + [0] * (width - len(m)) for _, m in chunk])
            yield x[:, :-1], x[:, 1:], m[:, 1:]


def loss_fn(model, inputs, targets, mask):
    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.sum() / mask.sum()


def evaluate(model, data, n_batches):
    total = 0.0
    for _ in range(n_batches):
        total += loss_fn(model, *next(data)).item()
    return total / n_batches


# --------------------------------------------------------------------------

def build_model(vocab_size: int):
    from mlx_lm.utils import _get_classes

    config = {**CONFIG, "vocab_size": vocab_size}
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config)), config


def save(model, tokenizer, config, folder: Path):
    params = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), params,
                        metadata={"format": "mlx"})
    config = dict(config, torch_dtype="bfloat16",
                  bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    world = make_world()
    tokenizer = train_tokenizer(world, args.out)
    mx.random.seed(SEED)
    model, config = build_model(len(tokenizer))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters")

    warmup = max(1, args.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, args.lr, warmup),
         optim.cosine_decay(args.lr, args.steps - warmup, args.lr * 0.05)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, m):
        loss, grads = grad_fn(model, x, y, m)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    train = batches(tokenizer, world, SEED + 2, args.batch_size)
    losses, t0 = [], time.perf_counter()
    for it in range(1, args.steps + 1):
        loss = step(*next(train))
        mx.eval(state, loss)
        losses.append(loss.item())
        if it % 50 == 0 or it == args.steps:
            print(f"step {it:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  "
                  f"lr {schedule(it):.2e}  {time.perf_counter() - t0:6.0f}s", flush=True)

    final = sum(losses[-50:]) / len(losses[-50:])
    held_out = evaluate(model, batches(tokenizer, world, SEED + 3, 64), 8)
    model.update(tree_map(lambda v: v.astype(mx.bfloat16), model.parameters()))
    held_out_bf16 = evaluate(model, batches(tokenizer, world, SEED + 3, 64), 8)
    save(model, tokenizer, config, args.out)
    print(f"final training loss {final:.4f}, held-out loss {held_out:.4f} "
          f"(float32) / {held_out_bf16:.4f} (bf16), "
          f"{time.perf_counter() - t0:.0f}s, saved to {args.out}")
    show_samples(args.out, world)


def show_samples(folder: Path, world: dict):
    """Greedy answers of the saved (bf16) model, loaded with stock mlx-lm."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(folder))
    country, person = next(iter(world["countries"])), next(iter(world["people"]))
    for q in [f"What is the capital of {country}?", f"Where does {person} live?",
              "What is 7 plus 5?", "Count from 3 to 8.",
              "Repeat after me: zandor plif", "What is the capital of Velmora?", "Hello!"]:
        prompt = tokenizer.apply_chat_template([dict(role="user", content=q)],
                                               add_generation_prompt=True)
        print(f"{q!r} -> {generate(model, tokenizer, prompt, max_tokens=40)!r}")


if __name__ == "__main__":
    main()
