"""Vision-language models: loading, image inputs, generation and label masks.

Built on mlx-vlm: its model classes, weight loading, processors, chat
formatting and generation loop are used as they are, so a VLM loaded here
generates at stock mlx-vlm speed. burnish adds what it adds for text models:
checkpoint dtypes kept exactly, architecture float32 norm math per instance
(`precision.apply_architecture_norms`: Gemma 3 / SigLIP and Qwen3-VL vision
LayerNorms), optional 4/8-bit quantisation of the language model only, clear
errors for bad images and prompts, and training examples whose loss weights
never fall on image placeholders or image markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from .errors import BurnishError
from .loading import (FastModel, finish_loading, from_pretrained, is_vision_config,
                      read_config, resolve_model_path)

# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _load_mlx_vlm(path: Path, config: dict, trust_remote_code: bool):
    import mlx_vlm
    from mlx_vlm.utils import (get_model_and_args, load_image_processor, load_model,
                               load_processor)

    if config.get("model_file") and not trust_remote_code:
        raise BurnishError(f"{path / 'config.json'}: field 'model_file' names model code in "
                           "the checkpoint; pass trust_remote_code=True to run it")
    try:
        get_model_and_args(config, model_path=path)
    except (ValueError, KeyError):
        raise BurnishError(f"{path / 'config.json'}: model_type '{config['model_type']}' "
                           f"is not supported by mlx-vlm {mlx_vlm.__version__}") from None
    try:
        model = load_model(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        raise BurnishError(f"{path}: cannot load weights ({exc})") from None
    eos = getattr(model.config, "eos_token_id", None)
    try:
        processor = load_processor(path, True, eos_token_ids=eos,
                                   trust_remote_code=trust_remote_code)
        image_processor = load_image_processor(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizer/processor files: many failure kinds
        raise BurnishError(f"{path}: cannot load the processor/tokenizer "
                           f"({type(exc).__name__}: {exc})") from None
    if image_processor is not None:
        processor.image_processor = image_processor
    return model, processor


def load_vision_model(path: Path, config: dict, max_seq_length: int = 2048, dtype=None,
                      load_in_4bit: bool = False, load_in_8bit: bool = False,
                      full_finetuning: bool = False,
                      trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load a vision-language checkpoint through mlx-vlm; `(model, processor)`.

    Called by `loading.from_pretrained` (arguments already checked there).
    Every parameter keeps its checkpoint dtype unless `dtype` is given;
    `load_in_4bit`/`load_in_8bit` quantise the language model's linear layers
    only (the vision tower and projector stay as stored).
    """
    model, processor = _load_mlx_vlm(path, config, trust_remote_code)
    finish_loading(model, path, config, max_seq_length=max_seq_length, dtype=dtype,
                   load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                   full_finetuning=full_finetuning,
                   quantize_target=model.language_model, is_vision=True)
    # Training examples need the model's config (image token ids, chat format).
    processor._burnish_model_config = model.config
    return model, processor


class FastVisionModel(FastModel):
    """`FastModel` for vision-language checkpoints; refuses text-only ones."""

    @staticmethod
    def from_pretrained(model_name, *args, **kwargs):
        path = resolve_model_path(model_name)
        config = read_config(path)
        if not is_vision_config(config):
            raise BurnishError(
                f"{path / 'config.json'}: model_type '{config['model_type']}' is a "
                "text-only model (no 'vision_config'); load it with "
                "FastModel.from_pretrained")
        return from_pretrained(path, *args, **kwargs)


# --------------------------------------------------------------------------
# Images and prompts
# --------------------------------------------------------------------------

_IMAGE_SOURCE_KEYS = ("image", "path", "url")


def is_vlm(model) -> bool:
    """A vision-language model: loaded by burnish as one, or an mlx-vlm model."""
    info = getattr(model, "_burnish", None)
    if info is not None:
        return info.is_vision
    config = getattr(model, "config", None)
    return (hasattr(model, "language_model")
            and getattr(config, "vision_config", None) is not None)


def load_image(source):
    """An RGB PIL image from a file path or a PIL image; BurnishError if not."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    if not isinstance(source, (str, Path)):
        raise BurnishError(f"image must be a file path or a PIL image, "
                           f"got {type(source).__name__}")
    text = str(source)
    if text.startswith(("http://", "https://")):
        raise BurnishError(f"{text}: burnish does not download images; "
                           "pass a local file or a PIL image")
    path = Path(text).expanduser()
    if not path.exists():
        raise BurnishError(f"{path}: image file not found")
    if not path.is_file():
        raise BurnishError(f"{path}: is not a file (expected an image file)")
    try:
        from PIL import ImageOps

        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")  # reads all pixel data: truncation shows here
    except Exception as exc:
        reason = str(exc).replace(str(path), "").strip(" :'\"") or type(exc).__name__
        raise BurnishError(f"{path}: cannot read image ({reason})") from None


def _image_parts(content) -> list[dict]:
    return [p for p in content if p.get("type") == "image"] if isinstance(content, list) else []


def _check_messages(messages) -> None:
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise BurnishError(f"prompt message {i}: needs 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BurnishError(f"prompt message {i}: 'content' must be a string or a list "
                               f"of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise BurnishError(f"prompt message {i} part {j}: a text part "
                                       "needs a string 'text'")
            elif kind != "image":
                raise BurnishError(f"prompt message {i} part {j}: expected a part of "
                                   "type 'text' or 'image', got "
                                   f"{kind if kind is not None else part!r}")


def _normalise(messages) -> list[dict]:
    """Messages with parts reduced to what the chat template renders."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image"
                       else {"type": "text", "text": p["text"]} for p in content]
        out.append({**message, "content": content})
    return out


def gather_images(prompt, images) -> tuple[Any, list]:
    """Split a prompt into (prompt for the chat template, loaded images).

    Images come from `images` (one or a list) or from the `image` (or `path`)
    field of image parts in the messages, not both.
    """
    if images is None:
        given = []
    elif isinstance(images, (list, tuple)):
        given = list(images)
    else:
        given = [images]
    if isinstance(prompt, str):
        return prompt, [load_image(x) for x in given]
    from .generation import is_messages

    if not is_messages(prompt):
        raise BurnishError(f"prompt must be a string or a list of chat messages, "
                           f"got {type(prompt).__name__}")
    _check_messages(prompt)
    parts = [(i, p) for i, m in enumerate(prompt) for p in _image_parts(m["content"])]
    sources = [next((p[k] for k in _IMAGE_SOURCE_KEYS if p.get(k) is not None), None)
               for _, p in parts]
    if given:
        if any(s is not None for s in sources):
            raise BurnishError("images were given both in the messages' image parts and "
                               "in images=; give them in one place")
        if parts and len(parts) != len(given):
            raise BurnishError(f"prompt has {len(parts)} image part(s) but "
                               f"{len(given)} image(s) were given")
    else:
        for (i, _), source in zip(parts, sources):
            if source is None:
                raise BurnishError(f"prompt message {i}: an image part has no image "
                                   "(put a path in its 'image' field or pass images=)")
        given = sources
    return _normalise(prompt), [load_image(x) for x in given]


def has_image_parts(prompt) -> bool:
    """Whether chat messages contain image parts (for routing in generation)."""
    from .generation import is_messages

    return is_messages(prompt) and any(
        isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in prompt)


def format_prompt(model, processor, prompt, num_images: int,
                  add_generation_prompt: bool = True) -> str:
    """The model's prompt text: mlx-vlm's chat formatting with image markers.

    A string is the user's message (as in mlx-vlm); messages keep their
    image parts where they are, and images without parts go to the last user
    message.
    """
    from mlx_vlm.prompt_utils import apply_chat_template

    try:
        return apply_chat_template(processor, model.config, prompt,
                                   add_generation_prompt=add_generation_prompt,
                                   num_images=num_images)
    except BurnishError:
        raise
    except Exception as exc:  # jinja and formatter errors of many kinds
        raise BurnishError(f"prompt: the chat template failed "
                           f"({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


def _text_only_error(model) -> BurnishError:
    info = getattr(model, "_burnish", None)
    where = f" ({info.path})" if info is not None else ""
    kind = f"model_type '{info.model_type}'" if info is not None else type(model).__name__
    return BurnishError(f"the prompt has images but the model is a text-only {kind}{where}; "
                        "images need a vision-language checkpoint")


def _reset_stopping(model, processor):
    """Stop on the model's eos tokens only, as stock `mlx_vlm.generate` does."""
    from mlx_vlm.utils import StoppingCriteria

    tokenizer = getattr(processor, "tokenizer", processor)
    eos = getattr(model.config, "eos_token_id", None)
    criteria = getattr(tokenizer, "stopping_criteria", None)
    if criteria is None:
        tokenizer.stopping_criteria = StoppingCriteria(eos, tokenizer)
    else:
        criteria.reset(eos)


def stream_generate_vision(model, processor, prompt, images=None, max_new_tokens: int = 256,
                           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                           min_p: float = 0.0, repetition_penalty: float | None = None,
                           seed: int | None = None,
                           stop: str | Sequence[str] | None = None) -> Iterator:
    """Yield `GenerationChunk`s for a prompt with images, on mlx-vlm's loop.

    `prompt`: a string (the user's message) or chat messages whose content is
    a string or a list of `{"type": "text", "text": ...}` / `{"type":
    "image"[, "image": path]}` parts. `images`: file paths or PIL images.
    """
    from mlx_vlm.generate import stream_generate as vlm_stream_generate

    from .generation import check_sampling, stream_chunks

    if not is_vlm(model):
        raise _text_only_error(model)
    check_sampling(max_new_tokens, temperature, top_p)
    if top_k < 0:
        raise BurnishError(f"top_k={top_k} must be >= 0")
    prompt, pictures = gather_images(prompt, images)
    text = format_prompt(model, processor, prompt, len(pictures))
    _reset_stopping(model, processor)
    if seed is not None:
        mx.random.seed(seed)
    # One chunk per token, as mlx-vlm streams (its text may be empty while
    # the detokenizer or a possible stop string holds text back).
    yield from stream_chunks(
        vlm_stream_generate(model, processor, text, image=pictures or None,
                            max_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty),
        stop, every_token=True)


# --------------------------------------------------------------------------
# Training examples
# --------------------------------------------------------------------------

# Config fields that name image/video placeholder and marker tokens.
_MEDIA_ID_FIELDS = (
    "image_token_index", "image_token_id", "video_token_index", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id",
    "image_start_token_id", "image_end_token_id", "video_start_token_id",
    "video_end_token_id", "boi_token_index", "eoi_token_index", "boi_token_id",
    "eoi_token_id",
)
# Processor/tokenizer attributes that name such tokens.
_MEDIA_TOKEN_ATTRS = ("image_token", "video_token", "boi_token", "eoi_token",
                      "vision_start_token", "vision_end_token")


def _get(config, key):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def media_token_ids(processor, config) -> set[int]:
    """Ids of image/video placeholders and their start/end markers."""
    ids = set()
    for key in _MEDIA_ID_FIELDS:
        value = _get(config, key)
        if isinstance(value, int):
            ids.add(value)
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (processor, tokenizer):
        for attr in _MEDIA_TOKEN_ATTRS:
            token = getattr(owner, attr, None)
            if isinstance(token, str) and token:
                tid = tokenizer.convert_tokens_to_ids(token)
                if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                    ids.add(tid)
        for attr in ("image_token_id", "video_token_id"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                ids.add(value)
    return ids


def _model_config(processor, config):
    if config is None:
        config = getattr(processor, "_burnish_model_config", None)
    elif isinstance(config, nn.Module):
        config = getattr(config, "config", None)
    if config is None:
        raise BurnishError("build_vlm_example: pass config=model (the processor was not "
                           "loaded by burnish, so the model's config is unknown)")
    return config


def _encode(processor, config, text, images) -> dict:
    """Model inputs for one prompt text, exactly as generation prepares them."""
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    try:
        return prepare_inputs(
            processor, images=images or None, prompts=text,
            image_token_index=_get(config, "image_token_index"),
            add_special_tokens=should_add_special_tokens(_get(config, "model_type"),
                                                         processor))
    except Exception as exc:
        raise BurnishError(f"the processor failed on this example "
                           f"({type(exc).__name__}: {exc})") from None


def _ids(inputs) -> list[int]:
    return [int(t) for t in inputs["input_ids"].reshape(-1).tolist()]


def build_vlm_example(processor, messages, images=None, completion_only: bool = True,
                      config=None) -> dict:
    """Tokens, loss weights and model inputs for one chat with images.

    `messages`: chat messages whose content is a string or a list of text and
    image parts (an image part may carry its path in `image`); `images`:
    paths or PIL images for parts without one (or, with no image parts, for
    the last user message). `config`: the model (or its config); optional
    for processors loaded by burnish.

    Returns a dict with `input_ids` (list of ints), `weights` (0/1 per token;
    1 means the token is a target predicted from the tokens before it) and
    the model inputs from the processor (`pixel_values`, `attention_mask`,
    `image_grid_thw`, ... as mx arrays). With `completion_only`, only the
    assistant turns (and their end-of-turn tokens) are targets; the first
    token, image placeholders, image start/end markers and padding never are.
    """
    from .data import _fix_turn_ends
    from .generation import is_messages

    config = _model_config(processor, config)
    if not is_messages(messages):
        raise BurnishError("build_vlm_example: messages must be a non-empty list of "
                           "chat messages")
    model = _Config(config)
    prompt, pictures = gather_images(messages, images)
    roles = [m["role"] for m in prompt]
    if completion_only and "assistant" not in roles:
        raise BurnishError("build_vlm_example: no assistant message to train on")
    # How many images the first i messages hold: explicit parts in place,
    # images without parts belong to the last user message.
    explicit = [len(_image_parts(m["content"])) for m in prompt]
    implicit = len(pictures) - sum(explicit)
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=-1)
    if implicit and last_user < 0:
        raise BurnishError("build_vlm_example: images were given but there is no user "
                           "message to put them in")

    def images_before(i):
        return sum(explicit[:i]) + (implicit if last_user < i else 0)

    text = format_prompt(model, processor, prompt, len(pictures), add_generation_prompt=False)
    inputs = _encode(processor, config, text, pictures)
    ids = _ids(inputs)
    tokenizer = getattr(processor, "tokenizer", processor)
    if completion_only:
        weights = [0] * len(ids)
        for i, role in enumerate(roles):
            if role != "assistant":
                continue
            spans = []
            for upto, gen in ((i, True), (i + 1, False)):
                n = images_before(upto)
                part = format_prompt(model, processor, prompt[:upto], n,
                                     add_generation_prompt=gen)
                # (the processor runs again on the images of the prefix: the
                # number of image tokens depends on them)
                part_ids = ids if part == text else _ids(
                    _encode(processor, config, part, pictures[:n]))
                if ids[:len(part_ids)] != part_ids:
                    raise BurnishError(
                        f"messages[{i}]: the chat template renders the conversation up to "
                        "this assistant turn differently from the whole conversation; "
                        "cannot locate the turn")
                spans.append(len(part_ids))
            for t in range(spans[0], spans[1]):
                weights[t] = 1
        weights = _fix_turn_ends(tokenizer, ids, weights)
    else:
        weights = [1] * len(ids)
    never = media_token_ids(processor, config)
    mask = inputs.get("attention_mask")
    pad = [0] * len(ids) if mask is None else [1 - int(m) for m in mask.reshape(-1).tolist()]
    weights = [0 if t == 0 or tok in never or pad[t] else w
               for t, (tok, w) in enumerate(zip(ids, weights))]
    extra = {k: v for k, v in inputs.items() if k != "input_ids" and v is not None}
    return {"input_ids": ids, "weights": weights, **extra}


class _Config:
    """Stand-in with `.config` for mlx-vlm helpers that take a model."""

    def __init__(self, config):
        self.config = config
