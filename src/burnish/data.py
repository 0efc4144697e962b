"""Training data: readers, formatting with loss masks, batching and packing.

The pipeline is

    rows = load_rows("train.jsonl")                    # list of dicts
    examples = format_examples(rows, tokenizer)         # tokens + 0/1 weights
    for batch in iterate_batches(examples, 4, seed=0, epoch=0):
        loss, n = losses.loss_and_count(model, batch)

An `Example` marks which tokens are training targets (`weights[i] == 1` means
tokens[i] is predicted from tokens[:i]). A `Batch` is shifted: inputs are
tokens[:-1], targets tokens[1:], and weights already sit on the targets.
`batch_plan` is a pure function of (examples, seed, epoch) so that a resumed
run recomputes it and skips to where it stopped.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from .errors import BurnishError, read_json

if TYPE_CHECKING:  # mlx is imported lazily, where arrays are made
    import mlx.core as mx

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Example:
    tokens: list[int]
    weights: list[int]

    def __len__(self):
        return len(self.tokens)


class Rows(list):
    """A list of row dicts that remembers where each row came from.

    `where(i)` gives "data.jsonl:17" for files and "<list>[3]" otherwise, so
    that formatting errors can point at the offending line.
    """

    def __init__(self, rows, source="<list>", lines=None):
        super().__init__(rows)
        self.source = source
        self.lines = lines

    def where(self, i):
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source}[{i}]"


# --------------------------------------------------------------------------
# Readers


def load_rows(source, split_name="train") -> Rows:
    """Read rows from a list of dicts, a `datasets.Dataset`, or a file.

    Files: `.jsonl` (one JSON object a line, blank lines skipped) or `.json`
    (a list of objects, or an object holding `split_name`). A folder is read
    as mlx-lm's layout: `<folder>/<split_name>.jsonl`.
    """
    if isinstance(source, (str, Path)):
        rows = _read_file(Path(source), split_name)
    elif isinstance(source, Rows):
        rows = source
    elif isinstance(source, (list, tuple)):
        rows = Rows(source)
    else:
        rows = _from_datasets(source, split_name)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BurnishError(
                f"{rows.where(i)}: expected a JSON object (dict) per row, "
                f"got {type(row).__name__}"
            )
    if len(rows) == 0:
        raise BurnishError(f"{rows.source}: the dataset is empty (no rows)")
    return rows


def _from_datasets(source, split_name):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        if split_name not in source:
            raise BurnishError(
                f"dataset has no split {split_name!r} (splits: {', '.join(source)})"
            )
        source = source[split_name]
    if datasets is not None and isinstance(source, datasets.Dataset):
        return Rows(source.to_list(), source=f"Dataset[{split_name}]")
    raise BurnishError(
        "training data must be a list of dicts, a datasets.Dataset or a path to "
        f".jsonl/.json, got {type(source).__name__}"
    )


def _read_file(path: Path, split_name: str) -> Rows:
    if path.is_dir():
        candidate = path / f"{split_name}.jsonl"
        if not candidate.exists():
            raise BurnishError(f"{path}: folder has no {split_name}.jsonl")
        path = candidate
    if not path.exists():
        raise BurnishError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows, lines = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BurnishError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
                lines.append(n)
        return Rows(rows, source=str(path), lines=lines)
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get(split_name), list):
            data = data[split_name]
        if not isinstance(data, list):
            raise BurnishError(
                f"{path}: expected a JSON list of rows (or an object with a "
                f"{split_name!r} list), got {type(data).__name__}"
            )
        return Rows(data, source=str(path))
    raise BurnishError(f"{path}: unsupported data file type {path.suffix!r} (use .jsonl or .json)")


# --------------------------------------------------------------------------
# Formatting and loss masks


def _hf(tokenizer):
    """The Hugging Face tokenizer behind mlx-lm's TokenizerWrapper."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def _control_ids(hf):
    ids = set(getattr(hf, "all_special_ids", []) or [])
    ids.update(getattr(hf, "added_tokens_decoder", {}) or {})
    return ids


def _encode(hf, text, add_special_tokens):
    """Token ids and, per token, its (start, end) character span in `text`."""
    if getattr(hf, "is_fast", False):
        enc = hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(hf.encode(text, add_special_tokens=add_special_tokens)), None


def _mark_spans(hf, text, ids, offsets, spans, add_special_tokens):
    """0/1 weights: 1 for tokens that overlap one of the character spans."""
    weights = [0] * len(ids)
    for start, end in spans:
        if offsets is not None:
            hits = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
        else:  # slow tokenizer: find the boundaries by encoding prefixes
            a = len(hf.encode(text[:start], add_special_tokens=add_special_tokens))
            b = len(hf.encode(text[:end], add_special_tokens=add_special_tokens))
            hits = range(a, b)
        for j in hits:
            weights[j] = 1
    return weights


class _RowError(Exception):
    """A problem in one row; format_examples adds where the row is."""


def _render(hf, messages, tools, add_generation_prompt):
    try:
        return hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # templates raise jinja errors of many kinds
        raise _RowError(f"field 'messages': the chat template failed ({type(e).__name__}: {e})")


def _check_messages(messages, field="messages"):
    if not isinstance(messages, list) or not messages:
        raise _RowError(f"field '{field}' must be a non-empty list of messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _RowError(f"field '{field}[{k}]' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise _RowError(
                f"field '{field}[{k}].role': unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            continue
        if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type") in ("image", "image_url")
                for part in content):
            raise _RowError(f"field '{field}[{k}].content' has an image part: images need a "
                            "vision-language model (FastVisionModel)")
        if not isinstance(content, str):
            raise _RowError(
                f"field '{field}[{k}].content' must be a string, got {type(content).__name__}"
            )


def _chat_example(hf, messages, tools, train_from, completion_only):
    """Tokens of a rendered chat; assistant turns at index >= train_from are trained.

    The span of assistant turn i starts where the rendering of messages[:i]
    with the generation prompt ends (what the model sees at inference) and
    ends where the rendering of messages[:i+1] ends, or, for templates that
    render history differently (e.g. dropping reasoning), after the turn's
    content. The end-of-turn token is trained; whitespace after it is not.
    """
    text = _render(hf, messages, tools, False)
    ids, offsets = _encode(hf, text, add_special_tokens=False)
    if not completion_only:
        return ids, [0] + [1] * (len(ids) - 1)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        head = _render(hf, messages[:i], tools, True)
        if not text.startswith(head):
            raise _RowError(
                f"field 'messages[{i}]': the chat template renders the conversation before this "
                "assistant turn differently from the whole conversation; cannot locate the turn"
            )
        upto = _render(hf, messages[: i + 1], tools, False)
        if text.startswith(upto):
            end = len(upto)
        else:
            content = (m.get("content") or "").strip()
            pos = text.find(content, len(head))
            if not content or pos < 0:
                raise _RowError(
                    f"field 'messages[{i}].content': assistant text not found in the rendered chat"
                )
            end = pos + len(content)
        spans.append((len(head), end))
    weights = _mark_spans(hf, text, ids, offsets, spans, False)
    return ids, _fix_turn_ends(hf, ids, weights)


def _fix_turn_ends(hf, ids, weights):
    """Train each turn's end-of-turn token, not the whitespace after it."""
    control = _control_ids(hf)
    n = len(ids)
    j = 0
    while j < n:
        if not weights[j]:
            j += 1
            continue
        k = j
        while k + 1 < n and weights[k + 1]:
            k += 1
        # run j..k is trained
        specials = [p for p in range(j, k + 1) if ids[p] in control]
        if specials:
            for p in range(specials[-1] + 1, k + 1):
                if hf.decode([ids[p]]).strip() == "":
                    weights[p] = 0
        elif k + 1 < n and ids[k + 1] in control:
            weights[k + 1] = 1
            k += 1
        j = k + 1
    return weights


def _prompt_completion_example(hf, prompt, completion, completion_only):
    text = prompt + completion
    ids, offsets = _encode(hf, text, add_special_tokens=True)
    eos = hf.eos_token_id
    if completion_only:
        weights = _mark_spans(hf, text, ids, offsets, [(len(prompt), len(text))], True)
    else:
        weights = [1] * len(ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        weights.append(1)
    weights[0] = 0
    return ids, weights


def _text_example(hf, text):
    ids = list(hf.encode(text, add_special_tokens=True))
    eos = hf.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, [0] + [1] * (len(ids) - 1)


def _format_row(hf, row, completion_only, text_field):
    if "messages" in row:
        _check_messages(row["messages"])
        keep = True if completion_only is None else completion_only
        return _chat_example(hf, row["messages"], row.get("tools"), 0, keep)
    if "prompt" in row or "completion" in row:
        for field in ("prompt", "completion"):
            if field not in row:
                raise _RowError(f"field '{field}' is missing (prompt/completion rows need both)")
        prompt, completion = row["prompt"], row["completion"]
        keep = True if completion_only is None else completion_only
        if isinstance(prompt, str) and isinstance(completion, str):
            return _prompt_completion_example(hf, prompt, completion, keep)
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, "prompt")
            _check_messages(completion, "completion")
            return _chat_example(hf, prompt + completion, row.get("tools"), len(prompt), keep)
        raise _RowError(
            "fields 'prompt' and 'completion' must both be strings or both be lists of "
            f"messages, got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if text_field in row:
        if not isinstance(row[text_field], str):
            raise _RowError(f"field '{text_field}' must be a string, got {type(row[text_field]).__name__}")
        return _text_example(hf, row[text_field])
    found = ", ".join(repr(k) for k in row) or "none"
    raise _RowError(
        f"row has none of the known fields {text_field!r}, 'prompt'+'completion', "
        f"'messages' (found: {found})"
    )


def format_examples(rows, tokenizer, max_seq_length=2048, completion_only_loss=None,
                    dataset_text_field="text", source_name="<list>") -> list[Example]:
    """Tokenize rows into Examples with 0/1 loss weights.

    Row formats: {dataset_text_field: str} (all tokens trained),
    {"prompt", "completion"} (strings: plain concatenation plus EOS; lists of
    messages: rendered with the chat template), {"messages": [...]} (chat
    template). `completion_only_loss=None` trains only the completion /
    assistant tokens for the last two; False trains every token.
    """
    rows = as_rows(rows, source_name)
    hf = _hf(tokenizer)
    examples, truncated, cut_away, untrained, text_rows = [], 0, 0, 0, 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BurnishError(f"{rows.where(i)}: expected an object (dict), got {type(row).__name__}")
        try:
            tokens, weights = _format_row(hf, row, completion_only_loss, dataset_text_field)
        except _RowError as e:
            raise BurnishError(f"{rows.where(i)}: {e}") from None
        text_rows += "messages" not in row and "prompt" not in row
        if not any(weights[1:]):
            untrained += 1
            continue
        if len(tokens) > max_seq_length:
            truncated += 1
            tokens, weights = tokens[:max_seq_length], weights[:max_seq_length]
            if not any(weights[1:]):
                cut_away += 1
                continue
        weights[0] = 0  # the first token is never predicted
        examples.append(Example(tokens, weights))
    if completion_only_loss and text_rows:
        warnings.warn(
            f"{rows.source}: completion_only_loss=True has no effect on {text_rows} "
            f"'{dataset_text_field}' rows; all their tokens are trained",
            stacklevel=2,
        )
    return finish_examples(rows, examples, max_seq_length=max_seq_length,
                           truncated=truncated, cut_away=cut_away, untrained=untrained,
                           stacklevel=2)


def as_rows(rows, source_name: str) -> "Rows":
    """`rows` as `Rows`; a plain list (or one read without a source) is named
    `source_name` in error messages."""
    if not isinstance(rows, Rows) or (rows.lines is None and rows.source == "<list>"):
        rows = Rows(rows, source=source_name)
    return rows


def finish_examples(rows, examples: list, *, max_seq_length: int, truncated: int,
                    cut_away: int = 0, untrained: int = 0, stacklevel: int = 2) -> list:
    """One warning with what formatting cut or dropped; an error if nothing
    is left to train. `stacklevel` is as the caller would pass it to
    `warnings.warn` (1 = the caller's own line)."""
    notes = []
    if truncated:
        notes.append(f"truncated {truncated} of {len(rows)} examples to max_seq_length={max_seq_length} tokens")
    if cut_away:
        notes.append(f"dropped {cut_away} whose trained tokens were all cut off")
    if untrained:
        notes.append(f"dropped {untrained} rows with no trained tokens")
    if notes:
        warnings.warn(f"{rows.source}: " + "; ".join(notes), stacklevel=stacklevel + 1)
    if not examples:
        raise BurnishError(f"{rows.source}: no example has any trained tokens")
    return examples


# --------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    inputs: "mx.array"  # (B, L) int32 = tokens[:, :-1]
    targets: "mx.array"  # (B, L) int32 = tokens[:, 1:]
    weights: "mx.array"  # (B, L) float32 0/1
    segments: Optional["mx.array"]  # (B, L) int32 document id per position (packed only)
    n_tokens: int  # trained target tokens in this batch
    # Optional (K,) int32 flat positions (into B*L) of the trained targets,
    # padded with untrained positions to a multiple of `gather_multiple`:
    # the loss then runs the output head on these K positions only.
    index: Optional["mx.array"] = None


def _rng(seed, epoch):
    return np.random.default_rng([int(seed), int(epoch)])


def _pack(lengths, capacity, order):
    """Best-fit of items (visited in `order`) into rows of <= capacity tokens."""
    import bisect

    rows, free = [], []  # free: sorted list of (room left, row index)
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(int(i))
            bisect.insort(free, (room - n, r))
        else:
            rows.append([int(i)])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def batch_plan(examples, batch_size, seed=0, packing=False, max_seq_length=2048,
               shuffle=True, epoch=0) -> list:
    """The batches of one epoch, as a pure function of (examples, seed, epoch).

    Unpacked: a list of batches, each a list of example indices. Examples are
    sorted by length (ties broken at random), cut into batches of
    `batch_size`, and the batch order is shuffled, so each batch holds
    similar lengths and padding stays small.

    Packed: a list of batches, each a list of `batch_size` rows, each row a
    list of example indices whose token counts sum to <= max_seq_length
    (best-fit, longest first). Rows are grouped by total length the same way.
    Every example appears exactly once per epoch.
    """
    if batch_size < 1:
        raise BurnishError(f"batch_size must be >= 1, got {batch_size}")
    rng = _rng(seed, epoch)
    lengths = np.array([len(e.tokens) for e in examples], dtype=np.int64)
    tie = rng.random(len(lengths)) if shuffle else np.arange(len(lengths))
    if packing:
        longest_first = np.lexsort((tie, -lengths))
        units = _pack(lengths, max_seq_length, longest_first)
        unit_lengths = np.array([lengths[u].sum() for u in units])
    else:
        units = [[int(i)] for i in range(len(lengths))]
        unit_lengths = lengths
    tie = rng.random(len(units)) if shuffle else np.arange(len(units))
    order = np.lexsort((tie, unit_lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    if packing:
        return [[units[u] for u in b] for b in batches]
    return [[int(i) for i in b] for b in batches]


def make_batch(examples, plan_entry, pad_to_multiple=32, packing=False, pad_id=0,
               gather_multiple=0) -> Batch:
    """Pad one plan entry into arrays; the length is a multiple of pad_to_multiple.

    gather_multiple > 0 also lists the trained positions (`Batch.index`),
    rounded up to that multiple, so that the loss skips the output head on
    prompt and padding positions. Each new count is a new shape for
    `mx.compile`: a coarse multiple keeps recompilation rare.
    """
    import mlx.core as mx

    rows = plan_entry if packing else [[i] for i in plan_entry]
    seqs = []
    for row in rows:
        toks, wts, segs = [], [], []
        for d, i in enumerate(row, start=1):
            ex = examples[i]
            toks.extend(ex.tokens)
            # a document's first token is not predicted from the one before it
            wts.extend([0] + list(ex.weights[1:]))
            segs.extend([d] * len(ex.tokens))
        seqs.append((toks, wts, segs))
    length = max(len(t) for t, _, _ in seqs) - 1
    m = max(1, int(pad_to_multiple))
    length = max(m, -(-length // m) * m)
    B = len(seqs)
    inputs = np.full((B, length), pad_id, dtype=np.int32)
    targets = np.zeros((B, length), dtype=np.int32)  # 0: a valid index even if pad_id is not
    weights = np.zeros((B, length), dtype=np.float32)
    segments = np.zeros((B, length), dtype=np.int32)
    for b, (toks, wts, segs) in enumerate(seqs):
        n = len(toks) - 1
        inputs[b, :n] = toks[:-1]
        targets[b, :n] = toks[1:]
        weights[b, :n] = wts[1:]
        segments[b, :n] = segs[:-1]
    index = None
    if gather_multiple:
        flat = weights.reshape(-1)
        trained = np.flatnonzero(flat)
        k = -(-len(trained) // gather_multiple) * gather_multiple
        if k >= flat.size:
            index = np.arange(flat.size)
        else:
            index = np.concatenate([trained, np.flatnonzero(flat == 0)[: k - len(trained)]])
        index = mx.array(np.sort(index).astype(np.int32))
    return Batch(
        inputs=mx.array(inputs),
        targets=mx.array(targets),
        weights=mx.array(weights),
        segments=mx.array(segments) if packing else None,
        n_tokens=int(weights.sum()),
        index=index,
    )


def iterate_batches(examples, batch_size, *, seed=0, epoch=0, start=0, packing=False,
                    max_seq_length=2048, pad_to_multiple=32, shuffle=True,
                    pad_id=0, gather_multiple=0) -> Iterator[Batch]:
    """Batches of one epoch from plan position `start` on (for exact resume)."""
    plan = batch_plan(examples, batch_size, seed=seed, packing=packing,
                      max_seq_length=max_seq_length, shuffle=shuffle, epoch=epoch)
    for entry in plan[start:]:
        yield make_batch(examples, entry, pad_to_multiple=pad_to_multiple,
                         packing=packing, pad_id=pad_id, gather_multiple=gather_multiple)


# --------------------------------------------------------------------------
# Packing: per-layer stand-in caches that give a block-diagonal causal mask

# Model types whose positions are absolute (learned position embeddings):
# packed documents would see positions that run across the row.
_ABSOLUTE_POSITIONS = {"gpt2", "gpt_bigcode", "opt", "bloom"}


class _PackedCache:
    """Stands in for a KV cache during a training forward pass of packed rows.

    mlx-lm models ask the cache for their attention mask (`make_mask`), call
    `update_and_fetch(k, v)` and read `offset` for RoPE. Returning the keys
    and values unchanged with offset 0 is a plain forward pass; the mask
    keeps each document to itself. RoPE only sees relative positions, so a
    document's logits do not depend on where it sits in the row.
    """

    offset = 0

    def __init__(self, masks):
        self._masks = masks

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, N, return_array=False, window_size=None, **kwargs):
        return self._masks(N, window_size)


def _packing_check(model):
    kind = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    if kind in _ABSOLUTE_POSITIONS or (inner is not None and "wpe" in inner):
        raise BurnishError(f"packing is not supported for {kind}: it uses absolute position embeddings")
    if hasattr(model, "make_cache"):
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        for c in model.make_cache():
            if type(c) not in (KVCache, RotatingKVCache):
                raise BurnishError(
                    f"packing is not supported for {kind}: it has layers with a {type(c).__name__} "
                    "(recurrent state or chunked attention would cross documents)"
                )


def packed_caches(model, segments) -> list:
    """One stand-in cache per layer for `model(inputs, cache=packed_caches(model, seg))`.

    `segments` (B, L) holds a document id per position; positions attend only
    to earlier positions of the same document (and within the sliding window
    when a layer asks for one).
    """
    import mlx.core as mx

    _packing_check(model)
    made = {}

    def masks(N, window_size):
        if N != segments.shape[1]:
            raise BurnishError(f"packed mask for length {N} but segments have length {segments.shape[1]}")
        if window_size not in made:
            pos = mx.arange(N)
            allowed = (pos[:, None] >= pos[None, :])
            if window_size is not None:
                allowed = allowed & (pos[:, None] < pos[None, :] + window_size)
            same = segments[:, :, None] == segments[:, None, :]
            made[window_size] = (same & allowed)[:, None]
        return made[window_size]

    return [_PackedCache(masks) for _ in range(len(model.layers))]
