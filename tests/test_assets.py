"""The bundled tiny chat model and the demo task data (scripts/build_tiny_model.py,
scripts/make_demo_task.py)."""

import json
import re
from pathlib import Path

import burnish  # noqa: F401  (first: BLAS routing)

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

ASSETS = Path(burnish.__file__).parent / "assets"
MODEL = ASSETS / "tiny-chat"
TASK = ASSETS / "demo_task"
SKILL_ANSWERS = ("I can add.", "I can subtract.", "I can count.", "I can repeat words.",
                 "I know some facts.")


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm import load

    return load(str(MODEL))


def ask(model, tokenizer, question, max_tokens=32):
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def test_folder_layout_and_size():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16"
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MB"


def test_every_parameter_is_bf16_and_count_in_range(loaded):
    model, _ = loaded
    params = tree_flatten(model.parameters())
    assert {str(v.dtype) for _, v in params} == {"mlx.core.bfloat16"}
    # The file itself is bf16 too (not upcast by a loader).
    stored = mx.load(str(MODEL / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {mx.bfloat16}
    n = sum(v.size for _, v in params)
    assert 2_000_000 <= n <= 10_000_000, n


def test_tokenizer_has_chat_template(loaded):
    _, tokenizer = loaded
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<pad>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("question, answer", [
    ("Hello!", "Hello! How can I help you today?"),
    ("Who are you?", "I am a tiny chat model made by burnish."),
    ("Thank you!", "You are welcome!"),
])
def test_greedy_answers_of_training_distribution(loaded, question, answer):
    model, tokenizer = loaded
    assert ask(model, tokenizer, question) == answer


@pytest.mark.parametrize("question, pattern", [
    ("What is 3 plus 4?", r"\d+ plus \d+ is \d+\."),
    ("Count from 2 to 6.", r"2(, \d+)+\."),
    ("What is the capital of Velmora?", r"I do not know the capital of \w+\."),
])
def test_answers_have_the_shape_of_training_answers(loaded, question, pattern):
    # The recorded model is under-trained: it answers in the right form, but
    # its arithmetic and name copying are not reliable yet.
    model, tokenizer = loaded
    assert re.fullmatch(pattern, ask(model, tokenizer, question))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_demo_task_files_parse_with_expected_fields():
    train, test = read_jsonl(TASK / "train.jsonl"), read_jsonl(TASK / "test.jsonl")
    assert len(train) >= 60 and len(test) >= 20
    for row in train + test:
        assert set(row) == {"messages"}
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] in SKILL_ANSWERS
    # Held-out prompts: no test prompt is seen in training.
    assert not {r["messages"][0]["content"] for r in train} & \
        {r["messages"][0]["content"] for r in test}


def test_base_model_does_not_already_do_the_demo_task(loaded):
    model, tokenizer = loaded
    test = read_jsonl(TASK / "test.jsonl")[:10]
    hits = sum(ask(model, tokenizer, r["messages"][0]["content"])
               == r["messages"][1]["content"] for r in test)
    assert hits <= 1


def test_demo_runs_end_to_end_and_reaches_its_target(tmp_path):
    # The whole demo recipe (~40 s of training): the accuracy it prints is the
    # accuracy it gets, from under 20% to over 80% on the held-out prompts.
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "demo", "--output-dir",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "before fine-tuning: exact match 0%" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 400
    assert summary["accuracy_before"] < 0.2 and summary["accuracy_after"] > 0.8, summary
    assert f"exact match: 0% -> {summary['accuracy_after']:.0%}" in proc.stdout
    for name in ("adapters/adapters.safetensors", "merged/config.json",
                 "metrics.jsonl", "loss.png"):
        assert (out / name).exists(), name
