"""`generate` / `stream_generate` on mlx-lm's sampler, KV cache and detokeniser.

burnish adds prompt handling (text, chat messages, batches), stop strings
and statistics; the decoding loop itself is stock mlx-lm's, so generation
speed is stock speed for a model that kept its checkpoint dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from .errors import BurnishError


@dataclass
class GenerationChunk:
    """One streamed piece of text with running statistics.

    `prompt_tps` / `generation_tps` are tokens per second; `peak_memory` is
    the peak memory MLX allocated so far, in GB (1e9 bytes).
    """

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None  # "stop" (eos or stop string), "length"


def is_vision_model(model) -> bool:
    info = getattr(model, "_burnish", None)
    return bool(info is not None and info.is_vision)


def is_messages(prompt) -> bool:
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(m, dict) for m in prompt))


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids for a string or for a list of chat messages."""
    if is_messages(prompt):
        for i, message in enumerate(prompt):
            if "role" not in message or "content" not in message:
                raise BurnishError(f"prompt message {i}: needs 'role' and 'content'")
        if getattr(tokenizer, "chat_template", None) is None:
            raise BurnishError("prompt is a list of chat messages but the "
                               "tokenizer has no chat template")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                             tokenize=False)
        # The template already holds any BOS token it wants.
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        return tokenizer.encode(prompt, add_special_tokens=bos is None
                                or not prompt.startswith(bos))
    raise BurnishError(f"prompt must be a string or a list of chat messages, "
                       f"got {type(prompt).__name__}")


def check_sampling(max_new_tokens, temperature, top_p) -> None:
    """The option checks shared by the text and the vision paths."""
    if max_new_tokens <= 0:
        raise BurnishError(f"max_new_tokens={max_new_tokens} must be positive")
    if temperature < 0:
        raise BurnishError(f"temperature={temperature} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise BurnishError(f"top_p={top_p} must be in (0, 1]")


def _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty):
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    check_sampling(max_new_tokens, temperature, top_p)
    # mlx-lm spells "no top-p" as 0.0.
    sampler = make_sampler(temp=temperature, top_p=0.0 if top_p >= 1.0 else top_p,
                           min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty)
    return sampler, processors


def _split_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool, int]:
    """(text before the first stop string, found?, chars safe to emit)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True, cut
    # Hold back a tail that could be the start of a stop string.
    hold = max((len(s) - 1 for s in stop), default=0)
    return text, False, max(0, len(text) - hold)


def stream_chunks(responses, stop, every_token: bool = False) -> Iterator[GenerationChunk]:
    """`GenerationChunk`s from mlx-lm / mlx-vlm streaming responses, ending
    at the first stop string (which is not emitted). Text that could be the
    start of a stop string is held back; with `every_token` a chunk is yielded
    for every response even when its text is empty."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    text, emitted = "", 0
    for r in responses:
        text += r.text
        finish = r.finish_reason
        kept, found, safe = _split_at_stop(text, stop) if stop else (text, False, len(text))
        if found:
            text, safe, finish = kept, len(kept), "stop"
        elif finish is not None:
            safe = len(text)
        if every_token or safe > emitted or finish is not None:
            yield GenerationChunk(
                text=text[emitted:safe], token=None if r.token is None else int(r.token),
                prompt_tokens=r.prompt_tokens, prompt_tps=r.prompt_tps,
                generation_tokens=r.generation_tokens, generation_tps=r.generation_tps,
                peak_memory=r.peak_memory, finish_reason=finish)
            emitted = safe
        if finish is not None:
            return


def stream_generate(model, tokenizer, prompt, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: float | None = None,
                    seed: int | None = None, stop: str | Sequence[str] | None = None,
                    images=None) -> Iterator[GenerationChunk]:
    """Yield `GenerationChunk`s for one prompt (a string or chat messages).

    `images` (file paths or PIL images) go to a vision-language model."""
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    from .vision import has_image_parts

    if images is not None or is_vision_model(model) or has_image_parts(prompt):
        from .vision import stream_generate_vision

        yield from stream_generate_vision(
            model, tokenizer, prompt, images=images, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        return

    sampler, processors = _sampling(max_new_tokens, temperature, top_p, top_k, min_p,
                                    repetition_penalty)
    if seed is not None:
        mx.random.seed(seed)
    tokens = encode_prompt(tokenizer, prompt)
    yield from stream_chunks(
        mlx_stream_generate(model, tokenizer, tokens, max_tokens=max_new_tokens,
                            sampler=sampler, logits_processors=processors), stop)


def generate(model, tokenizer, prompt, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, repetition_penalty: float | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None,
             images=None, verbose: bool = False):
    """Generate text for a prompt; a list of prompts is generated as a batch
    and returns a list of texts. A prompt is a string or a list of chat
    messages (rendered with the tokenizer's chat template)."""
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, top_k=top_k, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    if isinstance(prompt, (list, tuple)) and prompt and not is_messages(prompt):
        if images is not None or is_vision_model(model):
            raise BurnishError("batched generation with images is not supported; "
                               "pass one prompt at a time")
        return _generate_batch(model, tokenizer, list(prompt), **options)
    text, last = "", None
    for chunk in stream_generate(model, tokenizer, prompt, images=images, **options):
        text += chunk.text
        last = chunk
        if verbose:
            print(chunk.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return text


def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p,
                    top_k, min_p, repetition_penalty, seed, stop):
    from mlx_lm.generate import batch_generate

    sampler, processors = _sampling(max_new_tokens, temperature, top_p, top_k, min_p,
                                    repetition_penalty)
    if seed is not None:
        mx.random.seed(seed)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    response = batch_generate(model, tokenizer, encoded, max_tokens=max_new_tokens,
                              sampler=sampler, logits_processors=processors)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    return [_split_at_stop(t, stop)[0] if stop else t for t in response.texts]


def format_stats(chunk: GenerationChunk) -> str:
    return (f"prompt: {chunk.prompt_tokens} tokens, {chunk.prompt_tps:.1f} tok/s | "
            f"generation: {chunk.generation_tokens} tokens, "
            f"{chunk.generation_tps:.1f} tok/s | peak memory: {chunk.peak_memory:.3f} GB")
