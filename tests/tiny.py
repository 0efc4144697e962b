"""Build tiny, real models as Hugging Face folders for the tests.

Every model is an instance of an mlx-lm model class with a small config,
random weights in the requested dtype, and a byte-level BPE tokenizer trained
here on a few generated sentences, with a ChatML chat template. Nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is two plus three? two plus three is five.",
    "hello world, this is a tiny model for tests.",
    "user assistant system: the capital of zorbia is quellton.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g",
] * 20

# Small but architecture-faithful configs (Hugging Face field names).
BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
)

CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                  tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16,
                  tie_word_embeddings=True, rope_theta=10000.0),
    "gemma3_text": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                        head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                        sliding_window_pattern=2, rms_norm_eps=1e-6),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"],
                 num_key_value_heads=4),
    "stablelm": dict(model_type="stablelm", architectures=["StableLmForCausalLM"],
                     layer_norm_eps=1e-5, use_qkv_bias=False, qk_layernorm=True,
                     partial_rotary_factor=0.25, num_key_value_heads=4,
                     tie_word_embeddings=False),
    "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"],
                  tie_word_embeddings=False),
}


def make_tokenizer(folder: Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer and save it in Hugging Face layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


def make_model(model_type: str, vocab_size: int, **overrides) -> nn.Module:
    from mlx_lm.utils import _get_classes

    config = {**BASE, **CONFIGS[model_type], "vocab_size": vocab_size, **overrides}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    return model, config


def build(folder, model_type: str = "llama", dtype=mx.bfloat16, seed: int = 0,
          **overrides) -> Path:
    """Write a tiny random `model_type` model to `folder`; return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    mx.random.seed(seed)
    model, config = make_model(model_type, len(tokenizer), **overrides)
    # Random norm scales (not all ones) so that dtype mistakes show in values.
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        if k.endswith("norm.weight") or "layernorm" in k or k.endswith("norm.bias"):
            params[k] = v + 0.1 * mx.random.normal(v.shape)
    params = {k: v.astype(dtype) for k, v in params.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), params,
                        metadata={"format": "mlx"})
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16",
                             mx.float32: "float32"}[dtype]
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config["bos_token_id"] = tokenizer.convert_tokens_to_ids("<s>")
    config["pad_token_id"] = tokenizer.convert_tokens_to_ids("<pad>")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
