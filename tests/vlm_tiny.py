"""Build tiny, real vision-language models as Hugging Face folders.

Every model is an instance of an mlx-vlm model class (Gemma 3 with its SigLIP
tower, Qwen3-VL, GLM-OCR) with a small config and random weights in the
requested dtype, saved next to a processor made here: a byte-level BPE
tokenizer trained on a few sentences that holds the architecture's image
tokens, a chat template that renders image parts with them, and the
architecture's image-processor settings for small images. Nothing is
downloaded. `image()` makes small deterministic PIL images.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a red square on a white page. a blue circle in the corner.",
    "describe the image. the image shows a small striped pattern.",
    "what is written here? the text says hello world.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g",
] * 20


def _content(open_image: str) -> str:
    """Jinja for a message's content: a string, or text and image parts."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ '{open_image}' }}}}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


# Per architecture: special tokens (first is padding), roles of the named
# special tokens, the chat template, and the eos token(s).
ARCHS = {
    "gemma3": dict(
        specials=["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        named=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
        extra=dict(image_token="<image_soft_token>", boi_token="<start_of_image>",
                   eoi_token="<end_of_image>"),
        template=(
            "{{ bos_token }}{% for message in messages %}"
            "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{ '<start_of_turn>' + role + '\n' }}" + _content("<start_of_image>")
            + "{{ '<end_of_turn>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
        ),
        eos=["<eos>", "<end_of_turn>"],
    ),
    "qwen3_vl": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
        named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        extra={},
        template=(
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' }}"
            + _content("<|vision_start|><|image_pad|><|vision_end|>")
            + "{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        eos=["<|im_end|>", "<|endoftext|>"],
    ),
    "glm_ocr": dict(
        specials=["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>"],
        named=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        extra={},
        template=(
            "[gMASK]<sop>{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>\n' }}"
            + _content("<|begin_of_image|><|image|><|end_of_image|>")
            + "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        ),
        eos=["<|endoftext|>", "<|user|>"],
    ),
}

# Image side: patches of 8 pixels, 32x32 images by default (16 patches, 4
# image tokens after the 2x2 merge).
IMAGE_SIZE = 32
PATCH = 8


def make_tokenizer(folder: Path, arch: str, vocab_size: int = 400, eos: bool = True):
    """Train a byte-level BPE tokenizer with `arch`'s special tokens; save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = ARCHS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    named = dict(spec["named"])
    if not eos:
        named.pop("eos_token", None)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=spec["extra"],
                                   **named)
    fast.chat_template = spec["template"]
    fast.save_pretrained(str(folder))
    return fast


def _ids(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def _gemma3(tok, vocab, text, vision, size):
    image_token, pad = _ids(tok, "<image_soft_token>", "<pad>")
    text = {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64,
            "sliding_window_pattern": 2, "mm_tokens_per_image": 4, "vocab_size": vocab,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 512, **text}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32,
              "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
              "patch_size": PATCH, "image_size": size, "layer_norm_eps": 1e-6,
              **vision}
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": text, "vision_config": vision,
              "image_token_index": image_token, "pad_token_id": pad,
              "hidden_size": text["hidden_size"], "vocab_size": vocab}
    image_processor = {
        "image_processor_type": "Gemma3ImageProcessor",
        "size": {"height": vision["image_size"], "width": vision["image_size"]},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "resample": 2, "rescale_factor": 1 / 255,
    }
    processor = {"processor_class": "Gemma3Processor",
                 "image_seq_length": text["mm_tokens_per_image"]}
    return config, image_processor, processor


def _qwen3_vl(tok, vocab, text, vision, size):
    image, video, start, end, pad = _ids(tok, "<|image_pad|>", "<|video_pad|>",
                                         "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")
    text = {"model_type": "qwen3_vl_text", "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": vocab, "rope_theta": 10000.0,
            "max_position_embeddings": 512, "tie_word_embeddings": False,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True}, **text}
    vision = {"model_type": "qwen3_vl", "depth": 2, "hidden_size": 32,
              "intermediate_size": 64, "num_heads": 2, "out_hidden_size": text["hidden_size"],
              "patch_size": PATCH, "temporal_patch_size": 2, "spatial_merge_size": 2,
              "num_position_embeddings": (size // PATCH) ** 2, "deepstack_visual_indexes": [0],
              **vision}
    config = {"model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"],
              "text_config": text, "vision_config": vision, "image_token_id": image,
              "video_token_id": video, "vision_start_token_id": start,
              "vision_end_token_id": end, "pad_token_id": pad, "vocab_size": vocab,
              "tie_word_embeddings": False}
    pixels = size * size
    image_processor = {"patch_size": vision["patch_size"], "temporal_patch_size": 2,
                       "merge_size": 2, "min_pixels": pixels, "max_pixels": pixels,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return config, image_processor, None


def _glm_ocr(tok, vocab, text, vision, size):
    image, video, boi, eoi, bov, eov, pad = _ids(
        tok, "<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>",
        "<|begin_of_video|>", "<|end_of_video|>", "<|endoftext|>")
    eos = _ids(tok, *ARCHS["glm_ocr"]["eos"])
    text = {"model_type": "glm_ocr_text", "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": vocab,
            "max_position_embeddings": 512, "eos_token_id": eos, "pad_token_id": pad,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                "partial_rotary_factor": 1.0, "rope_theta": 10000},
            **text}
    vision = {"model_type": "glm_ocr_vision", "depth": 2, "hidden_size": 32,
              "intermediate_size": 64, "num_heads": 2, "patch_size": PATCH,
              "image_size": size, "out_hidden_size": text["hidden_size"],
              "spatial_merge_size": 2, "temporal_patch_size": 2, "rms_norm_eps": 1e-5,
              **vision}
    config = {"model_type": "glm_ocr", "architectures": ["GlmOcrForConditionalGeneration"],
              "text_config": text, "vision_config": vision, "image_token_id": image,
              "video_token_id": video, "image_start_token_id": boi,
              "image_end_token_id": eoi, "video_start_token_id": bov,
              "video_end_token_id": eov, "pad_token_id": pad, "vocab_size": vocab,
              "hidden_size": text["hidden_size"]}
    # smart_resize counts the temporal patch (2 frames) in the pixel budget.
    pixels = 2 * size * size
    image_processor = {"patch_size": vision["patch_size"], "temporal_patch_size": 2,
                       "merge_size": 2, "size": {"shortest_edge": pixels,
                                                 "longest_edge": pixels}}
    return config, image_processor, None


_CONFIGS = {"gemma3": _gemma3, "qwen3_vl": _qwen3_vl, "glm_ocr": _glm_ocr}


def make_model(config: dict):
    """An mlx-vlm model instance for a Hugging Face style config dict."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    module, _ = get_model_and_args(config)
    model_config = module.ModelConfig.from_dict(config)
    model_config = update_module_configs(model_config, module, config, ["text", "vision"])
    return module.Model(model_config)


def build(folder, arch: str = "qwen3_vl", dtype=mx.bfloat16, seed: int = 0,
          text: dict | None = None, vision: dict | None = None, eos: bool = True,
          image_size: int = IMAGE_SIZE) -> Path:
    """Write a tiny random `arch` VLM with its processor to `folder`.

    `text` / `vision` override fields of the language / vision config (to
    build larger models, e.g. for benchmarks). With `eos=False` the model has
    no end-of-sequence token, so generation always runs to its token limit.
    Images are resized to `image_size` pixels square (patches of 8 pixels).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, arch, eos=eos)
    vocab = len(tok)
    config, image_processor, processor = _CONFIGS[arch](tok, vocab, text or {}, vision or {},
                                                        image_size)
    config["eos_token_id"] = _ids(tok, *ARCHS[arch]["eos"]) if eos else []
    if arch == "glm_ocr":
        config["text_config"]["eos_token_id"] = config["eos_token_id"]
    mx.random.seed(seed)
    model = make_model(config)
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        # Random norm scales and biases (not all ones/zeros) so that dtype
        # and precision mistakes show in values.
        if "norm" in k and k.endswith((".weight", ".bias")):
            params[k] = v + 0.1 * mx.random.normal(v.shape)
    if arch == "gemma3":
        key = "multi_modal_projector.mm_input_projection_weight"
        params[key] = 0.1 * mx.random.normal(params[key].shape)
    params = {k: v.astype(dtype) for k, v in params.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), params, metadata={"format": "mlx"})
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16",
                             mx.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    if processor is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def image(path=None, seed: int = 0, size=(40, 36)):
    """A small deterministic RGB PIL image (saved as PNG when `path` is given)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if path is not None:
        img.save(path)
        return Path(path)
    return img
