"""generate / stream_generate: prompts, chat messages, batches, stop strings, statistics."""

import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load

import burnish
from burnish.errors import BurnishError


@pytest.fixture(scope="module")
def loaded(model_factory):
    path = model_factory("llama", mx.float32)
    model, tokenizer = burnish.FastModel.from_pretrained(path)
    return path, model, tokenizer


def test_stream_statistics(loaded):
    _, model, tokenizer = loaded
    chunks = list(burnish.stream_generate(model, tokenizer, "hello world", max_new_tokens=12))
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.prompt_tokens == len(tokenizer.encode("hello world"))
    assert 1 <= last.generation_tokens <= 12
    assert last.prompt_tps > 0 and last.generation_tps > 0
    assert 0 < last.peak_memory < 10  # GB
    text = "".join(c.text for c in chunks)
    assert text == burnish.generate(model, tokenizer, "hello world", max_new_tokens=12)


def test_chat_messages_use_the_template(loaded):
    path, model, tokenizer = loaded
    messages = [{"role": "user", "content": "what is two plus three?"}]
    ours = burnish.generate(model, tokenizer, messages, max_new_tokens=16)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    stock, stock_tok = mlx_load(str(path))
    ids = stock_tok.encode(rendered, add_special_tokens=False)
    assert ours == mlx_generate(stock, stock_tok, ids, max_tokens=16)


def test_batch_equals_single(loaded):
    _, model, tokenizer = loaded
    prompts = ["the quick brown fox", "hello", [{"role": "user", "content": "hi"}]]
    batch = burnish.generate(model, tokenizer, prompts, max_new_tokens=10)
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, text in zip(prompts, batch):
        assert text == burnish.generate(model, tokenizer, prompt, max_new_tokens=10)


def test_stop_strings_truncate(loaded):
    _, model, tokenizer = loaded
    full = burnish.generate(model, tokenizer, "the quick", max_new_tokens=30)
    assert len(full) > 4
    stop = full[2:4]
    cut = full[: full.find(stop)]
    chunks = list(burnish.stream_generate(model, tokenizer, "the quick",
                                          max_new_tokens=30, stop=stop))
    assert "".join(c.text for c in chunks) == cut
    assert chunks[-1].finish_reason == "stop"
    assert burnish.generate(model, tokenizer, "the quick", max_new_tokens=30,
                            stop=[stop, "zzzz"]) == cut


def test_sampling_is_seeded(loaded):
    _, model, tokenizer = loaded
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = burnish.generate(model, tokenizer, "hello", **kw)
    b = burnish.generate(model, tokenizer, "hello", **kw)
    assert a == b


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_p": 0.0}, "top_p=0.0"),
])
def test_bad_generation_arguments(loaded, kwargs, message):
    _, model, tokenizer = loaded
    with pytest.raises(BurnishError, match=message):
        burnish.generate(model, tokenizer, "hi", **kwargs)


def test_cli_generate_streams_and_reports(loaded):
    path, _, _ = loaded
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "generate", "--model",
                           str(path), "--prompt", "hello", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "generation:" in proc.stderr and "peak memory" in proc.stderr


def test_cli_info():
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "info"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "mlx_version" in proc.stdout and "blas" in proc.stdout
