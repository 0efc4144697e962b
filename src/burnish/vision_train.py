"""Fine-tuning vision-language models with `get_peft_model` and `Trainer`.

* Adapter targets (`vlm_lora_keys`): linear layers inside the language
  model's transformer blocks and, on request, the vision tower's blocks, as
  full module paths, which is the key layout mlx-vlm's own adapter loading
  (`mlx_vlm.load(..., adapter_path=...)`) reads. The vision-language
  projector / patch merger is never adapted.
* Examples (`trainer_examples`): rows of chat `messages` whose content mixes
  text and image parts (paths or PIL images), optionally with a top-level
  `images` list for image parts without a source. Tokens and loss weights
  come from `vision.build_vlm_example`, so image placeholders, image markers
  and padding are never targets. Images are decoded again when a batch is
  built (pixel arrays of a whole data set are not kept in memory).
* Batches (`trainer_batches`) hold whole examples; the step runs one forward
  and backward pass per example and sums their gradients, so a micro-batch
  of k rows has exactly the token-weighted loss of a padded batch of k
  (images of different sizes need no padding). Packing is refused.
* The loss (`example_loss`) is the float32 token-weighted cross-entropy of
  `losses.cross_entropy_sum`, on logits computed the way mlx-vlm's
  generation computes them (`get_input_embeddings`, then the language model
  with a causal mask), so training sees the positions generation sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .errors import BurnishError

# --------------------------------------------------------------------------
# Adapter targets
# --------------------------------------------------------------------------

_VISION_TOWERS = ("vision_tower", "visual", "vision_model")


def _paths(model) -> dict[int, str]:
    return {id(m): p for p, m in model.named_modules()}


def vision_blocks(model) -> list[tuple[str, nn.Module]]:
    """(full path, block) of the vision tower's transformer blocks.

    The blocks are the longest list of modules under the tower whose members
    hold attention layers (SigLIP `encoder.layers`, Qwen-VL / GLM `blocks`);
    patch embedding, mergers and projectors are not blocks.
    """
    from .peft import _linear_paths, module_kind

    tower = next((getattr(model, n) for n in _VISION_TOWERS
                  if isinstance(getattr(model, n, None), nn.Module)), None)
    if tower is None:
        raise BurnishError(f"{type(model).__name__}: cannot find the vision tower "
                           f"(expected one of {', '.join(_VISION_TOWERS)})")
    paths = _paths(model)
    best = []
    for _, module in tower.named_modules():
        for value in module.values():
            if (isinstance(value, list) and len(value) > len(best)
                    and all(isinstance(b, nn.Module) for b in value)
                    and all(any(module_kind(p) == "attention" for p in _linear_paths(b))
                            for b in value)):
                best = value
    if not best:
        raise BurnishError(f"{type(model).__name__}: cannot find the vision tower's "
                           "transformer blocks")
    return [(paths[id(b)], b) for b in best]


def vlm_lora_keys(model, n: int, target_modules, language: bool, vision: bool,
                  attention: bool, mlp: bool) -> list[str]:
    """Full paths of the linear layers `get_peft_model` adapts in a VLM."""
    from .peft import _linear_paths, _select_keys, select_kinds, transformer_blocks

    if not (language or vision):
        raise BurnishError("get_peft_model: finetune_language_layers=False and "
                           "finetune_vision_layers=False leave nothing to fine-tune")
    paths = _paths(model)
    blocks = [(paths[id(b)], b) for b in transformer_blocks(model)]
    scope, chosen = [], []
    if language:
        scope += blocks
        chosen += blocks[-n:]
    if vision:
        scope += vision_blocks(model)
        chosen += vision_blocks(model)
    # Names are checked against every block in scope; the relative paths
    # they select are then taken from the chosen blocks.
    relative = set(_select_keys([b for _, b in scope], target_modules))
    pairs = [(f"{prefix}.{p}", p) for prefix, b in chosen for p in _linear_paths(b)
             if p in relative]
    kept = set(select_kinds(sorted({p for _, p in pairs}), attention, mlp))
    return sorted(k for k, p in pairs if p in kept)


# --------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------


@dataclass
class VLMExample:
    """One training row: tokens and 0/1 weights (as `data.Example`), and what
    rebuilds its model inputs (messages with resolved image paths, images)."""

    tokens: list[int]
    weights: list[int]
    messages: list
    images: list | None = None
    where: str = ""

    def __len__(self):
        return len(self.tokens)


@dataclass
class VLMBatch:
    """Examples trained in one micro-batch, each with its model inputs:
    `input_ids`, `weights` (1, L) and the processor's image arrays."""

    examples: list[dict]
    n_tokens: int  # trained target tokens in the batch


def is_vlm_examples(examples) -> bool:
    return bool(examples) and isinstance(examples[0], VLMExample)


def _resolve(source, base: Path | None):
    """A relative image path that is missing here but present next to the
    data file is taken from there."""
    if not isinstance(source, (str, Path)) or str(source).startswith(("http://", "https://")):
        return source
    path = Path(source).expanduser()
    if not path.is_absolute() and not path.exists() and base is not None \
            and (base / path).exists():
        return str(base / path)
    return source


def _resolve_row(row: dict, base: Path | None) -> tuple[list, list | None]:
    from .vision import _IMAGE_SOURCE_KEYS

    messages = []
    for m in row["messages"]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            content = [{**p, **{k: _resolve(p[k], base) for k in _IMAGE_SOURCE_KEYS
                                if p.get(k) is not None}}
                       if isinstance(p, dict) and p.get("type") == "image" else p
                       for p in content]
            m = {**m, "content": content}
        messages.append(m)
    images = row.get("images")
    if images is not None:
        images = [_resolve(x, base) for x in (images if isinstance(images, (list, tuple))
                                               else [images])]
    return messages, images


def _row_example(processor, model, row, where, base, completion_only) -> VLMExample:
    from .generation import is_messages
    from .vision import build_vlm_example

    if not isinstance(row.get("messages"), list) or not is_messages(row["messages"]):
        found = ", ".join(repr(k) for k in row) or "none"
        raise BurnishError(f"{where}: a vision-language model trains on rows with "
                           f"'messages' (chat messages, optionally with 'images'); "
                           f"found fields: {found}")
    unknown = sorted(set(row) - {"messages", "images"})
    if unknown:
        raise BurnishError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
                           "(a vision-language row has 'messages' and optional 'images')")
    messages, images = _resolve_row(row, base)
    try:
        ex = build_vlm_example(processor, messages, images, completion_only=completion_only,
                               config=model)
    except BurnishError as exc:
        raise BurnishError(f"{where}: {exc}") from None
    return VLMExample(ex["input_ids"], ex["weights"], messages, images, where)


def trainer_examples(trainer, dataset, split: str) -> list[VLMExample]:
    """`Trainer._examples` for a vision-language model."""
    from .data import as_rows, finish_examples, load_rows
    from .vision import media_token_ids

    c = trainer.config
    if c.packing:
        raise BurnishError("TrainingConfig.packing=True is not supported for vision-language "
                           "models (image features belong to one row); set packing=False")
    if trainer.world.size > 1:
        raise BurnishError("data-parallel training of vision-language models is not "
                           "supported yet; run on one process")
    if isinstance(dataset, (list, tuple)) and dataset and all(
            isinstance(e, VLMExample) for e in dataset):
        return list(dataset)
    rows = load_rows(dataset, split_name=split)
    rows = as_rows(rows, f"{split}_dataset")
    base = Path(rows.source).parent if rows.lines is not None else None
    completion_only = True if c.completion_only_loss is None else c.completion_only_loss
    never = media_token_ids(trainer.tokenizer, trainer.model.config)
    examples, truncated, untrained = [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i)
        ex = _row_example(trainer.tokenizer, trainer.model, row, where, base, completion_only)
        if len(ex.tokens) > c.max_seq_length:
            if never & set(ex.tokens[c.max_seq_length:]):
                raise BurnishError(
                    f"{where}: {len(ex.tokens)} tokens; cutting it to max_seq_length="
                    f"{c.max_seq_length} would cut image tokens (raise max_seq_length "
                    "or use smaller images)")
            truncated += 1
            ex.tokens, ex.weights = ex.tokens[:c.max_seq_length], ex.weights[:c.max_seq_length]
        if not any(ex.weights[1:]):
            untrained += 1
            continue
        examples.append(ex)
    return finish_examples(rows, examples, max_seq_length=c.max_seq_length,
                           truncated=truncated, untrained=untrained, stacklevel=3)


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def example_inputs(processor, model, ex: VLMExample) -> dict:
    """The model inputs of one example (images decoded again), as (1, L) arrays."""
    from .vision import build_vlm_example

    try:
        built = build_vlm_example(processor, ex.messages, ex.images, completion_only=False,
                                  config=model)
    except BurnishError as exc:
        raise BurnishError(f"{ex.where}: {exc}") from None
    n = len(ex.tokens)
    if built["input_ids"][:n] != ex.tokens:
        raise BurnishError(f"{ex.where}: the processor tokenized this row differently "
                           "than when the data set was read (did an image change?)")
    out = {k: v for k, v in built.items() if k not in ("input_ids", "weights")}
    if "attention_mask" in out:
        out["attention_mask"] = out["attention_mask"][:, :n]
    out["input_ids"] = mx.array([ex.tokens], dtype=mx.int32)
    out["weights"] = mx.array([ex.weights], dtype=mx.float32)
    return out


def trainer_batches(trainer, examples, batch_size, *, seed=0, epoch=0, start=0,
                    shuffle=True, **_text_only):
    """`Trainer._iterate` for VLM examples: the data module's batch plan
    (length-grouped, shuffled, a pure function of seed and epoch, so resume
    is exact), with whole examples in each batch. `_text_only`: padding and
    packing settings that do not apply."""
    from .data import batch_plan

    plan = batch_plan(examples, batch_size, seed=seed, shuffle=shuffle, epoch=epoch)
    for entry in plan[start:]:
        chosen = [examples[i] for i in entry]
        yield VLMBatch(
            examples=[example_inputs(trainer.tokenizer, trainer.model, e) for e in chosen],
            n_tokens=sum(int(sum(e.weights[1:])) for e in chosen))


# --------------------------------------------------------------------------
# Loss and step
# --------------------------------------------------------------------------

_NOT_MODEL_INPUTS = ("input_ids", "weights", "pixel_values", "attention_mask")


def vlm_logits(model, input_ids, inputs: dict):
    """Logits for `input_ids` (1, L) as mlx-vlm's generation computes them:
    image features merged into the embeddings, then the language model with
    its causal mask (the processor's attention mask only informs positions)."""
    kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = mask[:, :input_ids.shape[1]]
    emb = model.get_input_embeddings(input_ids, inputs.get("pixel_values"), mask=mask,
                                     **kwargs)
    kwargs.update({k: v for k, v in emb.to_dict().items()
                   if k != "inputs_embeds" and v is not None})
    out = model.language_model(inputs=input_ids, inputs_embeds=emb.inputs_embeds,
                               cache=None, **kwargs)
    return getattr(out, "logits", out)


def example_loss(model, inputs: dict):
    """(sum of weighted float32 cross-entropy, trained tokens) for one example."""
    from .losses import cross_entropy_sum

    ids = inputs["input_ids"]
    weights = inputs["weights"][:, 1:]
    logits = vlm_logits(model, ids[:, :-1], inputs)
    return cross_entropy_sum(logits, ids[:, 1:], weights), weights.sum()


def batch_loss(model, batch: VLMBatch):
    """(loss sum, token count) of a VLM batch, without gradients (evaluation)."""
    total, count = mx.array(0.0, mx.float32), mx.array(0.0, mx.float32)
    for inputs in batch.examples:
        t, c = example_loss(model, inputs)
        total, count = total + t, count + c
        mx.eval(total, count)
    return total, count


def _scaled_loss(model, inputs, scale):
    total, count = example_loss(model, inputs)
    return total * scale, (total, count)


def trainer_step(trainer, batch: VLMBatch, scale, acc, update):
    """`Trainer._run_step` for a VLM batch: one forward/backward pass per
    example, gradients summed into `acc`, the update applied when `update`."""
    model = trainer.model
    value_and_grad = nn.value_and_grad(model, _scaled_loss)
    total, count = mx.array(0.0, mx.float32), mx.array(0.0, mx.float32)
    for inputs in batch.examples:
        (_, (t, c)), grads = value_and_grad(model, inputs, scale)
        if trainer._grad_dtype is not None:
            grads = tree_map(lambda g: g.astype(trainer._grad_dtype), grads)
        acc = grads if acc is None else tree_map(mx.add, acc, grads)
        total, count = total + t, count + c
        mx.eval(acc, total, count)  # one example's graph alive at a time
    if not update:
        return total, count, acc, None
    return total, count, None, trainer._apply(acc)
