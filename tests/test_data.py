"""Data pipeline: readers, loss masks at chat-template boundaries, batching, packing."""

import burnish  # noqa: F401  (BLAS routing before mlx)

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm import load
from mlx_lm.tokenizer_utils import TokenizerWrapper

import tiny
from burnish import data, losses
from burnish.data import Example
from burnish.errors import BurnishError

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# ChatML that adds an empty reasoning block to the *last* assistant turn only,
# as Qwen3's template does: history renders differently from a prefix render.
THINKING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}

CHAT = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "what is two plus three?"},
    {"role": "assistant", "content": "two plus three is five."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world, the quick fox"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = {"chatml": tiny.make_tokenizer(tmp_path_factory.mktemp("chatml"))}
    for name, template, specials in [
        ("llama3", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        ("gemma", GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
        ("thinking", THINKING, []),
    ]:
        tok = tiny.make_tokenizer(tmp_path_factory.mktemp(name))
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        out[name] = tok
    return out


def trained_runs(tok, ex):
    """Decoded text of each contiguous run of trained tokens."""
    runs, cur = [], []
    for t, w in zip(ex.tokens, ex.weights):
        if w:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_multi_turn_chat_trains_only_assistant_text_and_end_of_turn(tokenizers, name):
    tok = tokenizers[name]
    (ex,) = data.format_examples([{"messages": CHAT}], tok)
    eot = END_OF_TURN[name]
    assert trained_runs(tok, ex) == [CHAT[2]["content"] + eot, CHAT[4]["content"] + eot]
    assert ex.tokens == list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    assert len(ex.weights) == len(ex.tokens)


def test_template_that_renders_history_differently(tokenizers):
    tok = tokenizers["thinking"]
    (ex,) = data.format_examples([{"messages": CHAT}], tok)
    assert trained_runs(tok, ex) == [
        CHAT[2]["content"] + "<|im_end|>",
        "<think>\n\n</think>\n\n" + CHAT[4]["content"] + "<|im_end|>",
    ]


def test_mlx_lm_tokenizer_wrapper_gives_the_same_examples(tokenizers):
    tok = tokenizers["chatml"]
    rows = [{"messages": CHAT}, {"prompt": "what is two plus three?", "completion": " five."}]
    plain = data.format_examples(rows, tok)
    wrapped = data.format_examples(rows, TokenizerWrapper(tok))
    assert plain == wrapped


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_prompt_completion(tokenizers, name):
    tok = tokenizers[name]
    (ex,) = data.format_examples([{"prompt": "what is two plus three?", "completion": " five."}], tok)
    assert trained_runs(tok, ex) == [" five." + tok.eos_token]
    assert tok.decode(ex.tokens) == "what is two plus three? five." + tok.eos_token
    # conversational prompt/completion: the chat template, completion trained
    row = {"prompt": CHAT[:2], "completion": CHAT[2:3]}
    (ex,) = data.format_examples([row], tok)
    assert trained_runs(tok, ex) == [CHAT[2]["content"] + END_OF_TURN[name]]


def test_text_rows_train_every_token_and_completion_only_false(tokenizers):
    tok = tokenizers["chatml"]
    (ex,) = data.format_examples([{"text": "the quick brown fox"}], tok)
    assert ex.tokens[-1] == tok.eos_token_id
    assert ex.weights == [0] + [1] * (len(ex.tokens) - 1)  # token 0 is never predicted
    (ex,) = data.format_examples([{"body": "the quick brown fox"}], tok, dataset_text_field="body")
    assert sum(ex.weights) == len(ex.tokens) - 1
    (ex,) = data.format_examples([{"messages": CHAT}], tok, completion_only_loss=False)
    assert ex.weights == [0] + [1] * (len(ex.tokens) - 1)


def test_truncation_warns_once_with_counts(tokenizers):
    tok = tokenizers["chatml"]
    rows = [
        {"text": "the quick brown fox jumps over the lazy dog"},
        {"text": "hello"},
        {"text": "numbers 0 1 2 3 4 5 6 7 8 9"},
        {"prompt": "the quick brown fox jumps over the lazy dog", "completion": " five."},
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = data.format_examples(rows, tok, max_seq_length=6, source_name="train")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "truncated 3 of 4 examples to max_seq_length=6" in messages[0]
    assert "dropped 1 whose trained tokens were all cut off" in messages[0]
    assert len(examples) == 3 and all(len(e.tokens) <= 6 for e in examples)


# --- bad data -----------------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'])
    with pytest.raises(BurnishError, match=r"data\.jsonl:3: invalid JSON"):
        data.load_rows(path)


def test_row_with_no_known_field_names_line_and_fields(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"text": "a"}', "", '{"question": "b", "answer": "c"}'])
    rows = data.load_rows(str(path))
    with pytest.raises(BurnishError, match=r"data\.jsonl:3: row has none of the known fields "
                                           r"'text', 'prompt'\+'completion', 'messages' \(found: 'question', 'answer'\)"):
        data.format_examples(rows, tokenizers["chatml"])


def test_unknown_role_names_line_and_field(tmp_path, tokenizers):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": CHAT}), json.dumps(bad)])
    with pytest.raises(BurnishError, match=r"chat\.jsonl:2: field 'messages\[1\]\.role': unknown role 'bot'"):
        data.format_examples(data.load_rows(path), tokenizers["chatml"])


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "user", "content": 3}]}, r"\[1\]: field 'messages\[0\]\.content' must be a string, got int"),
    ({"messages": []}, r"\[1\]: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]},
     r"\[1\]: field 'messages\[0\]\.content' has an image part: images need a vision-language model"),
    ({"prompt": "a"}, r"\[1\]: field 'completion' is missing"),
    ({"prompt": "a", "completion": 3}, r"\[1\]: fields 'prompt' and 'completion' must both be strings"),
    ({"text": None}, r"\[1\]: field 'text' must be a string, got NoneType"),
])
def test_bad_rows_in_a_list(tokenizers, row, match):
    with pytest.raises(BurnishError, match=r"^train_dataset" + match):
        data.format_examples([{"text": "ok"}, row], tokenizers["chatml"], source_name="train_dataset")


def test_empty_and_missing_datasets(tmp_path):
    with pytest.raises(BurnishError, match=r"empty\.jsonl: the dataset is empty"):
        data.load_rows(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(BurnishError, match="the dataset is empty"):
        data.load_rows([])
    with pytest.raises(BurnishError, match=r"data file not found: .*nope\.jsonl"):
        data.load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(BurnishError, match=r"\[1\]: expected a JSON object"):
        data.load_rows([{"text": "a"}, "b"])


def test_readers_json_folder_and_datasets(tmp_path, tokenizers):
    import datasets

    rows = [{"text": "hello world"}, {"prompt": "a", "completion": " b"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert data.load_rows(tmp_path / "d.json") == rows
    (tmp_path / "d2.json").write_text(json.dumps({"train": rows}))
    assert data.load_rows(tmp_path / "d2.json") == rows
    write_jsonl(tmp_path / "valid.jsonl", [json.dumps(r) for r in rows])
    assert data.load_rows(tmp_path, split_name="valid") == rows
    ds = datasets.Dataset.from_list([{"text": "hello world"}, {"text": "the fox"}])
    assert data.load_rows(ds) == [{"text": "hello world"}, {"text": "the fox"}]
    assert data.load_rows(datasets.DatasetDict({"train": ds}))[1] == {"text": "the fox"}


# --- batching -----------------------------------------------------------------


def examples_of(lengths):
    return [Example(tokens=[(7 * i + j) % 300 + 1 for j in range(n)], weights=[0] + [1] * (n - 1))
            for i, n in enumerate(lengths)]


def padding_fraction(examples, plan):
    real = padded = 0
    for entry in plan:
        b = data.make_batch(examples, entry)
        padded += b.inputs.size
        real += sum(len(examples[i].tokens) - 1 for i in entry)
    return 1 - real / padded


def test_length_sorting_really_groups_lengths():
    rng = np.random.default_rng(0)
    examples = examples_of(rng.integers(32, 1025, size=256).tolist())
    plan = data.batch_plan(examples, 8, seed=3)
    random_plan = [list(b) for b in np.array_split(rng.permutation(256), 32)]
    sorted_waste, random_waste = padding_fraction(examples, plan), padding_fraction(examples, random_plan)
    assert sorted_waste < 0.08 and random_waste > 0.3, (sorted_waste, random_waste)


def test_make_batch_shifts_pads_and_counts():
    examples = examples_of([5, 40, 12])
    examples[2].weights = [0, 0, 0, 0] + [1] * 8  # a prompt of 4 tokens
    b = data.make_batch(examples, [0, 1, 2], pad_to_multiple=32, pad_id=0)
    assert b.inputs.shape == (3, 64) and b.inputs.dtype == mx.int32
    assert b.targets.dtype == mx.int32 and b.weights.dtype == mx.float32 and b.segments is None
    for r, ex in enumerate(examples):
        n = len(ex.tokens) - 1
        assert b.inputs[r, :n].tolist() == ex.tokens[:-1]
        assert b.targets[r, :n].tolist() == ex.tokens[1:]
        assert b.weights[r, :n].tolist() == ex.weights[1:]
        assert b.weights[r, n:].sum().item() == 0
    assert b.n_tokens == 4 + 39 + 8 == int(b.weights.sum().item())


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2, 300), min_size=1, max_size=60),
       batch_size=st.integers(1, 9), seed=st.integers(0, 2**31), epoch=st.integers(0, 5),
       packing=st.booleans())
def test_batch_plan_invariants(lengths, batch_size, seed, epoch, packing):
    examples = examples_of(lengths)
    kw = dict(seed=seed, epoch=epoch, packing=packing, max_seq_length=300)
    plan = data.batch_plan(examples, batch_size, **kw)
    assert plan == data.batch_plan(examples, batch_size, **kw)  # deterministic
    if packing:
        rows = [row for entry in plan for row in entry]
        assert all(sum(lengths[i] for i in row) <= 300 for row in rows)
        assert all(1 <= len(entry) <= batch_size for entry in plan)
        seen = [i for row in rows for i in row]
    else:
        assert all(1 <= len(entry) <= batch_size for entry in plan)
        seen = [i for entry in plan for i in entry]
    assert sorted(seen) == list(range(len(lengths)))  # each example once per epoch
    assert sum(len(e) < batch_size for e in plan) <= 1  # at most one short batch


def test_plan_changes_with_epoch_and_iterate_resumes():
    examples = examples_of(list(range(10, 90)))
    a = data.batch_plan(examples, 4, seed=0, epoch=0)
    assert a != data.batch_plan(examples, 4, seed=0, epoch=1)
    assert a != data.batch_plan(examples, 4, seed=1, epoch=0)
    whole = list(data.iterate_batches(examples, 4, seed=0, epoch=0))
    resumed = list(data.iterate_batches(examples, 4, seed=0, epoch=0, start=7))
    assert len(whole) == 20 and len(resumed) == 13
    for x, y in zip(whole[7:], resumed):
        assert mx.array_equal(x.inputs, y.inputs) and x.n_tokens == y.n_tokens


def test_packing_fills_rows_and_masks_boundaries():
    rng = np.random.default_rng(1)
    examples = examples_of(rng.integers(20, 200, size=100).tolist())
    plan = data.batch_plan(examples, 2, packing=True, max_seq_length=512)
    rows = [row for entry in plan for row in entry]
    fill = sum(len(e.tokens) for e in examples) / (512 * len(rows))
    assert fill > 0.9
    b = data.make_batch(examples, plan[0], packing=True)
    for r, row in enumerate(plan[0]):
        start = 0
        for d, i in enumerate(row, start=1):
            n = len(examples[i].tokens)
            assert b.segments[r, start:start + n - 1].tolist() == [d] * (n - 1)
            if start > 0:  # the target at a document start is not trained
                assert b.weights[r, start - 1].item() == 0
            start += n
    assert b.n_tokens == sum(len(examples[i].tokens) - 1 for row in plan[0] for i in row)


# --- packing equivalence on tiny RoPE models ------------------------------------

PACKED_KINDS = ["llama", "olmo2", "qwen3", "gemma3_text"]


@pytest.fixture(scope="module")
def float32_models(tmp_path_factory):
    return {k: load(str(tiny.build(tmp_path_factory.mktemp(k), k, dtype=mx.float32)))[0]
            for k in PACKED_KINDS}


def doc_examples(V, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        w = [0] + [int(x) for x in rng.random(n - 1) > 0.3]
        out.append(Example(tokens=rng.integers(0, V, n).tolist(), weights=w))
    return out


@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_packed_rows_equal_unpacked_examples(float32_models, kind):
    model = float32_models[kind]
    # 70 tokens > gemma3's 64-token sliding window: the window mask is checked too
    examples = doc_examples(model.args.vocab_size, [20, 70, 30, 11])
    entry = [[0, 1, 2], [3]]
    packed = data.make_batch(examples, entry, packing=True)
    logits = model(packed.inputs, cache=data.packed_caches(model, packed.segments))
    total = 0.0
    for r, row in enumerate(entry):
        start = 0
        for i in row:
            single = data.make_batch(examples, [i])
            n = len(examples[i].tokens) - 1
            ref = model(single.inputs)[0, :n]
            np.testing.assert_allclose(np.array(logits[r, start:start + n]), np.array(ref), rtol=1e-5, atol=2e-5)
            loss_packed = losses.cross_entropy_sum(
                logits[r, start:start + n], packed.targets[r, start:start + n], packed.weights[r, start:start + n])
            loss_single = losses.loss_and_count(model, single)[0]
            assert loss_packed.item() == pytest.approx(loss_single.item(), rel=1e-5, abs=1e-5)
            total += loss_single.item()
            start += n + 1
    loss, count = losses.loss_and_count(model, packed)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert count.item() == packed.n_tokens == sum(sum(e.weights) for e in examples)


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_no_document_attends_to_another(float32_models, kind):
    model = float32_models[kind]
    examples = doc_examples(model.args.vocab_size, [25, 40])
    before = data.make_batch(examples, [[0, 1]], packing=True)
    examples[0].tokens = [(t + 1) % model.args.vocab_size for t in examples[0].tokens]
    after = data.make_batch(examples, [[0, 1]], packing=True)
    run = lambda b: model(b.inputs, cache=data.packed_caches(model, b.segments))
    a, b = run(before), run(after)
    assert not np.allclose(np.array(a[0, :24]), np.array(b[0, :24]))  # document 1 changed
    np.testing.assert_array_equal(np.array(a[0, 25:64]), np.array(b[0, 25:64]))  # document 2 did not


def test_packing_refuses_absolute_positions():
    from mlx_lm.utils import _get_classes

    config = dict(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
                  layer_norm_epsilon=1e-5, vocab_size=50)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    with pytest.raises(BurnishError, match="packing is not supported for gpt2"):
        data.packed_caches(model, mx.zeros((1, 32), mx.int32))


def test_errors_use_the_source_name_for_lists_read_by_load_rows(tokenizers):
    rows = data.load_rows([{"text": "a"}, {"x": 1}])
    with pytest.raises(BurnishError, match=r"^train_dataset\[1\]: row has none"):
        data.format_examples(rows, tokenizers["chatml"], source_name="train_dataset")


WORDS = st.sampled_from(["the", "quick", "fox", "two", "plus", "is", "five", "?", ".", ",",
                         " ", "\n", "zorbia", "42", "é", "hello world"])
CONTENT = st.builds(lambda first, rest: first + "".join(rest),
                    st.sampled_from(["the", "two", "hello", "42", "Zorbia"]),
                    st.lists(WORDS, max_size=12))


@settings(max_examples=30, deadline=None)
@given(turns=st.lists(st.tuples(CONTENT, CONTENT), min_size=1, max_size=3),
       system=st.booleans(), name=st.sampled_from(["chatml", "llama3"]))
def test_assistant_masks_for_random_chats(tokenizers, turns, system, name):
    tok = tokenizers[name]
    messages = [{"role": "system", "content": "be nice"}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    (ex,) = data.format_examples([{"messages": messages}], tok)
    clean = (lambda s: s.strip()) if name == "llama3" else (lambda s: s)  # llama3 template trims
    assert trained_runs(tok, ex) == [clean(a) + END_OF_TURN[name] for _, a in turns]
