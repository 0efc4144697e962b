"""Vision-language models: loading, generation with images, label masks, errors.

Tiny random Gemma 3 (SigLIP), Qwen3-VL and GLM-OCR models are built from
mlx-vlm model classes with locally made processors (tests/vlm_tiny.py).
"""

import json
import struct

import mlx.core as mx
import mlx.nn as nn
import pytest
import vlm_tiny
from mlx.utils import tree_flatten

from burnish.errors import BurnishError
from burnish.generation import generate, stream_generate
from burnish.loading import from_pretrained
from burnish.precision import apply_architecture_norms, architecture_norms
from burnish.vision import FastVisionModel, build_vlm_example, media_token_ids

ARCHS = ["gemma3", "qwen3_vl", "glm_ocr"]
PROMPT = "describe the image."


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(folder, image path) of a tiny bf16 model per architecture, built once."""
    cache = {}

    def make(arch):
        if arch not in cache:
            folder = vlm_tiny.build(tmp_path_factory.mktemp(arch) / "m", arch, mx.bfloat16)
            cache[arch] = folder, vlm_tiny.image(folder.parent / "img.png")
        return cache[arch]

    return make


@pytest.fixture(scope="module")
def loaded(vlm):
    cache = {}

    def load(arch):
        if arch not in cache:
            cache[arch] = from_pretrained(vlm(arch)[0])
        return cache[arch]

    return load


def stored_dtypes(folder):
    with open(folder / "model.safetensors", "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


# --------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("arch", ARCHS)
def test_load_keeps_checkpoint_dtypes(arch, vlm, loaded):
    folder, _ = vlm(arch)
    model, processor = loaded(arch)
    params = dict(tree_flatten(model.parameters()))
    assert set(stored_dtypes(folder).values()) == {"BF16"}
    assert {v.dtype for v in params.values()} == {mx.bfloat16}
    info = model._burnish
    assert info.is_vision and info.model_type == arch and info.path == folder
    assert info.param_dtypes == {k: v.dtype for k, v in params.items()}
    assert tree_flatten(model.trainable_parameters()) == []  # frozen until PEFT
    assert hasattr(processor, "image_processor")


def test_architecture_norms_on_vision_towers(loaded):
    gemma, _ = loaded("gemma3")
    rules = architecture_norms(gemma)
    assert rules["vision_tower.vision_model.encoder.layers.0.layer_norm1"] == \
        "gemma3-siglip-encoder-ln"
    assert rules["vision_tower.vision_model.post_layernorm"] == "gemma3-siglip-post-ln"
    assert rules["language_model.model.norm"] == "gemma3-vlm-text-rms"
    qwen, _ = loaded("qwen3_vl")
    assert {p for p, r in architecture_norms(qwen).items()
            if r == "qwen3-vl-vision-block-ln"} == {
        f"vision_tower.blocks.{i}.norm{j}" for i in (0, 1) for j in (1, 2)}
    # float32 math, weights still as stored, output in the activation dtype
    norm = qwen.vision_tower.blocks[0].norm1
    assert norm.weight.dtype == mx.bfloat16
    assert norm(mx.ones((2, 32), dtype=mx.bfloat16)).dtype == mx.bfloat16
    glm, _ = loaded("glm_ocr")
    assert architecture_norms(glm) == {}


def test_dtype_and_4bit_options(vlm):
    folder, _ = vlm("qwen3_vl")
    model, _ = from_pretrained(folder, dtype="float32")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    model, _ = from_pretrained(folder, load_in_4bit=True)
    assert model._burnish.quantization["bits"] == 4
    assert isinstance(model.language_model.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    vision = [m for _, m in model.vision_tower.named_modules()]
    assert not any(isinstance(m, nn.QuantizedLinear) for m in vision)
    assert model.vision_tower.blocks[0].mlp.linear_fc1.weight.dtype == mx.bfloat16


def test_fast_vision_model(vlm, model_factory):
    model, _ = FastVisionModel.from_pretrained(vlm("glm_ocr")[0])
    assert model._burnish.is_vision
    with pytest.raises(BurnishError, match="text-only model"):
        FastVisionModel.from_pretrained(model_factory("llama"))


def test_checkpoint_code_needs_trust_remote_code(vlm, tmp_path):
    import shutil

    folder = shutil.copytree(vlm("glm_ocr")[0], tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "model.py"}))
    (folder / "model.py").write_text("raise SystemExit('must not run')\n")
    with pytest.raises(BurnishError, match="config.json: field 'model_file'.*trust_remote_code"):
        from_pretrained(folder)


# --------------------------------------------------------------------------
# Generation


def stock_generate(folder, image, max_tokens, norms=False):
    from mlx_vlm import generate as vlm_generate
    from mlx_vlm import load
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = load(str(folder))
    if norms:
        apply_architecture_norms(model)
    prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
    return vlm_generate(model, processor, prompt, image=[str(image)],
                        max_tokens=max_tokens, temperature=0.0)


@pytest.mark.parametrize("arch", ["qwen3_vl", "glm_ocr"])
def test_greedy_generation_equals_stock_mlx_vlm(arch, vlm, loaded):
    folder, image = vlm(arch)
    model, processor = loaded(arch)
    chunks = list(stream_generate(model, processor, PROMPT, images=[image],
                                  max_new_tokens=12))
    stock = stock_generate(folder, image, 12)
    assert "".join(c.text for c in chunks) == stock.text
    last = chunks[-1]
    assert (last.prompt_tokens, last.generation_tokens) == (stock.prompt_tokens,
                                                            stock.generation_tokens)
    assert last.finish_reason == stock.finish_reason
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert sorted({c.generation_tokens for c in chunks}) == list(range(1, 13))  # per token
    # The same image given as a PIL image, in a message part, gives the same.
    messages = [{"role": "user", "content": [
        {"type": "image", "image": vlm_tiny.image()}, {"type": "text", "text": PROMPT}]}]
    assert generate(model, processor, messages, max_new_tokens=12) == stock.text


def test_gemma3_generation_is_stock_loop_with_float32_norm_math(vlm, loaded):
    # burnish runs Gemma 3's norms in float32 (as the reference model does),
    # stock mlx-vlm in bf16. The generation loop must be stock's exactly, and
    # burnish's logits must be closer than stock's to a float32 copy.
    folder, image = vlm("gemma3")
    model, processor = loaded("gemma3")
    text = generate(model, processor, PROMPT, images=str(image), max_new_tokens=12)
    assert text == stock_generate(folder, image, 12, norms=True).text

    from mlx_vlm import load
    from mlx_vlm.utils import prepare_inputs

    from burnish.loading import cast_floating
    from burnish.vision import format_prompt

    stock, _ = load(str(folder))
    reference, _ = load(str(folder))
    cast_floating(reference, mx.float32)
    inputs = prepare_inputs(processor, images=[vlm_tiny.image()],
                            prompts=format_prompt(model, processor, PROMPT, 1),
                            image_token_index=model.config.image_token_index)
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    ours, theirs, ref = (m(*args).logits for m in (model, stock, reference))
    assert ours.dtype == theirs.dtype == mx.bfloat16

    def error(x):
        return mx.abs(x.astype(mx.float32) - ref).mean().item()

    assert error(ours) < 0.8 * error(theirs)


def test_stop_strings_and_text_only_prompt_on_vlm(vlm, loaded):
    model, processor = loaded("glm_ocr")
    _, image = vlm("glm_ocr")
    full = generate(model, processor, PROMPT, images=image, max_new_tokens=12)
    stop = full[3:6]
    cut = generate(model, processor, PROMPT, images=image, max_new_tokens=12, stop=stop)
    assert cut == full[: full.find(stop)]
    # A VLM also answers text-only prompts (no image).
    chunks = list(stream_generate(model, processor, "hello world", max_new_tokens=4))
    assert chunks[-1].generation_tokens == 4


# --------------------------------------------------------------------------
# Bad input


def test_bad_images_and_text_only_models(vlm, loaded, tmp_path, model_factory):
    model, processor = loaded("qwen3_vl")
    missing = tmp_path / "nope.png"
    with pytest.raises(BurnishError, match=r"nope\.png: image file not found"):
        generate(model, processor, PROMPT, images=[missing])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really an image" * 10)
    with pytest.raises(BurnishError, match=r"garbage\.png: cannot read image"):
        generate(model, processor, PROMPT, images=[str(garbage)])
    with pytest.raises(BurnishError, match="2 image part.*1 image"):
        generate(model, processor, [{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}],
            images=[vlm("qwen3_vl")[1]])

    text_model, tokenizer = from_pretrained(model_factory("llama"))
    _, image = vlm("qwen3_vl")
    with pytest.raises(BurnishError, match="text-only model_type 'llama'"):
        generate(text_model, tokenizer, PROMPT, images=[image])
    message = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                            {"type": "text", "text": PROMPT}]}]
    with pytest.raises(BurnishError, match="text-only model_type 'llama'"):
        generate(text_model, tokenizer, message)


# --------------------------------------------------------------------------
# Training examples


def chat(image, answer="the image shows a small striped pattern."):
    return [
        {"role": "user", "content": [{"type": "image", "image": image},
                                     {"type": "text", "text": "describe the image."}]},
        {"role": "assistant", "content": answer},
    ]


def targets(example, tokenizer):
    ids = [t for t, w in zip(example["input_ids"], example["weights"]) if w]
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_label_masks_train_only_the_answer(arch, vlm, loaded):
    model, processor = loaded(arch)
    _, image = vlm(arch)
    tokenizer = processor.tokenizer
    answer = "the image shows a small striped pattern."
    example = build_vlm_example(processor, chat(str(image), answer))
    ids, text = targets(example, tokenizer)
    assert text.strip() == answer
    media = media_token_ids(processor, model.config)
    image_id = model.config.image_token_id if arch != "gemma3" else \
        model.config.image_token_index
    assert image_id in media and example["input_ids"].count(image_id) == 4
    assert not media & set(ids)
    assert "pixel_values" in example and len(example["weights"]) == len(example["input_ids"])
    # The example's inputs are the ones generation builds for this chat.
    logits = model(mx.array([example["input_ids"]]), example["pixel_values"],
                   mask=example["attention_mask"],
                   **{k: v for k, v in example.items() if k not in (
                       "input_ids", "weights", "pixel_values", "attention_mask")}).logits
    assert logits.shape[1] == len(example["input_ids"])

    full = build_vlm_example(processor, chat(str(image), answer), completion_only=False)
    ids, _ = targets(full, tokenizer)
    assert full["weights"][0] == 0 and not media & set(ids)
    assert len(ids) > len(targets(example, tokenizer)[0])


def test_label_masks_multi_turn_two_images(vlm, loaded):
    model, processor = loaded("qwen3_vl")
    _, image = vlm("qwen3_vl")
    messages = chat(None, "a red square.") + [
        {"role": "user", "content": [{"type": "text", "text": "and this one?"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a blue circle."}]},
    ]
    messages[0]["content"][0] = {"type": "image"}
    example = build_vlm_example(processor, messages, images=[image, vlm_tiny.image(seed=1)])
    ids, text = targets(example, processor.tokenizer)
    # Both answers and their end-of-turn tokens, nothing else.
    assert text == "a red square.a blue circle."
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2
    assert example["input_ids"].count(model.config.image_token_id) == 8
    assert example["image_grid_thw"].shape == (2, 3)
    with pytest.raises(BurnishError, match="no assistant message"):
        build_vlm_example(processor, messages[:1], images=[image])
