"""VLM fine-tuning with get_peft_model / Trainer on tiny random VLMs.

Tiny Gemma 3 (SigLIP), Qwen3-VL and GLM-OCR models from tests/vlm_tiny.py,
trained on a few generated image-caption pairs.
"""

import json

import mlx.core as mx
import pytest
import vlm_tiny
from mlx.utils import tree_flatten

from burnish.errors import BurnishError
from burnish.export import load_adapters, save_adapters
from burnish.loading import from_pretrained
from burnish.peft import get_peft_model, peft_config
from burnish.precision import norm_parameter_paths
from burnish.trainer import Trainer, TrainingConfig
from burnish.vision import media_token_ids
from burnish.vision_train import example_inputs, vlm_logits

CAPTIONS = ["a red square on a white page.", "a blue circle in the corner.",
            "the text says hello world.", "the quick brown fox"]
QUESTION = "describe the image."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(folder of images, rows of image-caption chats)."""
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for i, caption in enumerate(CAPTIONS):
        image = vlm_tiny.image(folder / f"img{i}.png", seed=i)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(image)},
                                         {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": caption}]})
    return folder, rows


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    cache = {}

    def make(arch):
        if arch not in cache:
            cache[arch] = vlm_tiny.build(tmp_path_factory.mktemp(arch) / "m", arch,
                                         mx.bfloat16)
        return cache[arch]

    return make


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=12, learning_rate=3e-3,
                per_device_train_batch_size=2, logging_steps=4, seed=0,
                lr_scheduler_type="constant", compute_dtype=None)  # bf16, as on a GPU
    base.update(kw)
    return TrainingConfig(**base)


def params(model, prefix=""):
    return {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(prefix)}


def dtypes(model):
    return {k: v.dtype for k, v in tree_flatten(model.parameters())}


class Probe:
    """Records the dtypes of norm parameters inside training."""

    def __init__(self, paths):
        self.paths, self.seen = paths, set()

    def on_step_end(self, trainer, step):
        p = params(trainer.model)
        self.seen |= {p[k].dtype for k in self.paths}


# --------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("arch", ["qwen3_vl", "gemma3"])
def test_lora_lowers_loss_vision_frozen_precision_scope(arch, vlm, data, tmp_path):
    model, processor = from_pretrained(vlm(arch))
    get_peft_model(model, r=8, lora_alpha=16)
    assert all(k.startswith("language_model.") for k in peft_config(model).keys)
    vision = params(model, "vision_tower.")
    before = dtypes(model)
    norms = norm_parameter_paths(model)
    assert any(k.startswith("vision_tower.") for k in norms)
    assert any(k.startswith("language_model.") for k in norms)
    probe = Probe(norms)
    _, rows = data
    trainer = Trainer(model, processor, rows, eval_dataset=rows, args=config(tmp_path),
                      callbacks=[probe], progress=False)
    start = trainer.evaluate()["eval_loss"]
    metrics = trainer.train()
    end = metrics["eval_loss"]
    print(f"{arch}: eval loss {start:.3f} -> {end:.3f}")
    assert end < 0.6 * start
    # inside training: every norm (vision and text) in float32
    assert probe.seen == {mx.float32}
    # afterwards: checkpoint dtypes everywhere, the vision tower bit for bit
    assert dtypes(model) == before
    assert {v for k, v in before.items() if not k.endswith(("lora_a", "lora_b"))} == \
        {mx.bfloat16}
    for k, v in params(model, "vision_tower.").items():
        assert mx.array_equal(v, vision[k]).item(), k
    assert (tmp_path / "out" / "metrics.jsonl").exists()


def test_vision_layers_train_and_adapters_load_in_mlx_vlm(vlm, data, tmp_path):
    import mlx_vlm

    folder = vlm("glm_ocr")
    model, processor = from_pretrained(folder)
    get_peft_model(model, r=8, lora_alpha=16, finetune_vision_layers=True,
                   finetune_mlp_modules=False)
    keys = peft_config(model).keys
    assert any(k.startswith("vision_tower.blocks.") for k in keys)
    assert all(".attn." in k or ".self_attn." in k for k in keys)
    vision = params(model, "vision_tower.")
    _, rows = data
    trainer = Trainer(model, processor, rows, args=config(tmp_path, max_steps=4),
                      progress=False)
    trainer.train()
    after = params(model, "vision_tower.")
    changed = {k for k, v in after.items() if not mx.array_equal(v, vision[k]).item()}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)  # not base
    assert {k.rsplit(".", 1)[0] for k in changed} == {
        k for k in keys if k.startswith("vision_tower.")}

    # The adapters are mlx-vlm's layout: stock mlx_vlm.load reads them, and
    # so does burnish's load_adapters; both give the trained model's logits.
    save_adapters(model, tmp_path / "adapters")
    model.eval()
    inputs = example_inputs(processor, model, trainer.train_examples[0])
    ids = inputs["input_ids"]
    ours = vlm_logits(model, ids, inputs)
    stock, _ = mlx_vlm.load(str(folder), adapter_path=str(tmp_path / "adapters"))
    assert mx.array_equal(vlm_logits(stock, ids, inputs), ours).item()
    fresh, _ = from_pretrained(folder)
    load_adapters(fresh, tmp_path / "adapters")
    assert mx.array_equal(vlm_logits(fresh, ids, inputs), ours).item()


def test_batch_of_two_equals_two_accumulated_micro_batches(vlm, data, tmp_path):
    _, rows = data
    folder = vlm("qwen3_vl")
    out = []
    for bs, accum in ((2, 1), (1, 2)):
        model, processor = from_pretrained(folder)
        get_peft_model(model, r=4)
        trainer = Trainer(model, processor, rows[:2], progress=False, args=config(
            tmp_path, max_steps=1, per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum, max_grad_norm=None))
        trainer.train()
        out.append((trainer.state.log_history[0]["loss"],
                    dict(tree_flatten(model.trainable_parameters()))))
    (loss_a, a), (loss_b, b) = out
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k


# --------------------------------------------------------------------------
# Layer selection


def test_layer_selection(vlm, model_factory):
    folder = vlm("qwen3_vl")

    def keys(**kw):
        model, _ = from_pretrained(folder)
        get_peft_model(model, r=4, **kw)
        return peft_config(model).keys

    language = keys()
    assert language and all(k.startswith("language_model.model.layers.") for k in language)
    assert {k.split(".")[-1] for k in keys(finetune_attention_modules=False)} == {
        "gate_proj", "up_proj", "down_proj"}
    assert all(".layers.1." in k for k in keys(finetune_last_n_layers=1))
    vision = keys(finetune_vision_layers=True, finetune_language_layers=False)
    assert {k.split(".", 3)[-1] for k in vision} == {"attn.qkv", "attn.proj",
                                                     "mlp.linear_fc1", "mlp.linear_fc2"}
    assert all(k.startswith("vision_tower.blocks.") for k in vision)  # no merger
    both = keys(finetune_vision_layers=True, target_modules=["qkv", "q_proj"])
    assert {k.split(".")[-1] for k in both} == {"qkv", "q_proj"}
    model, _ = from_pretrained(folder)
    with pytest.raises(BurnishError, match="no linear layer named 'qkv'"):
        get_peft_model(model, target_modules=["qkv"])  # vision layers not chosen
    with pytest.raises(BurnishError, match="leave nothing to fine-tune"):
        get_peft_model(model, finetune_language_layers=False)
    with pytest.raises(BurnishError, match="leave no layers"):
        get_peft_model(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(BurnishError, match="finetune_vision_layers='yes'"):
        get_peft_model(model, finetune_vision_layers="yes")
    assert peft_config(model) is None

    text, _ = from_pretrained(model_factory("llama"))
    get_peft_model(text, r=4, finetune_mlp_modules=False)
    assert peft_config(text).keys == ["self_attn.k_proj", "self_attn.o_proj",
                                      "self_attn.q_proj", "self_attn.v_proj"]
    text, _ = from_pretrained(model_factory("llama"))
    with pytest.raises(BurnishError, match="text-only model"):
        get_peft_model(text, finetune_vision_layers=True)
    with pytest.raises(BurnishError, match="finetune_language_layers=False"):
        get_peft_model(text, finetune_language_layers=False)


# --------------------------------------------------------------------------
# Examples and bad input


def test_trained_tokens_are_the_answers(vlm, data, tmp_path):
    folder, rows = data
    model, processor = from_pretrained(vlm("qwen3_vl"))
    get_peft_model(model, r=4)
    tok = processor.tokenizer
    media = media_token_ids(processor, model.config)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # A .jsonl file: relative image paths are found next to it, images may
    # come as a top-level list for image parts without a source.
    lines = [{"messages": [{"role": "user", "content": [
                 {"type": "image"}, {"type": "text", "text": QUESTION}]},
              {"role": "assistant", "content": CAPTIONS[0]}],
              "images": ["img0.png"]},
             rows[1]]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    for dataset, answers in ((rows, CAPTIONS), (str(path), CAPTIONS[:2])):
        trainer = Trainer(model, processor, dataset, args=config(tmp_path), progress=False)
        got = []
        for ex in trainer.train_examples:
            ids = [t for t, w in zip(ex.tokens, ex.weights) if w]
            assert not media & set(ids) and media & set(ex.tokens)
            assert ids[-1] == end and tok.decode(ids[:-1]) == answers[len(got)]
            got.append(tok.decode(ids[:-1]))
        assert got == answers
    # completion_only_loss=False: the prompt's text is trained, images still not
    trainer = Trainer(model, processor, rows, progress=False,
                      args=config(tmp_path, completion_only_loss=False))
    ex = trainer.train_examples[0]
    ids = [t for t, w in zip(ex.tokens, ex.weights) if w]
    assert not media & set(ids) and QUESTION in tok.decode(ids)


def test_bad_rows(vlm, data, tmp_path):
    folder, rows = data
    model, processor = from_pretrained(vlm("qwen3_vl"))
    get_peft_model(model, r=4)
    missing = json.loads(json.dumps(rows))
    missing[1]["messages"][0]["content"][0]["image"] = str(tmp_path / "nope.png")
    with pytest.raises(BurnishError, match=r"^train_dataset\[1\]: .*nope\.png: image file "
                                           r"not found$"):
        Trainer(model, processor, missing, args=config(tmp_path))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(missing[1]) + "\n")
    with pytest.raises(BurnishError, match=r"bad\.jsonl:2: .*nope\.png: image file not found"):
        Trainer(model, processor, str(path), args=config(tmp_path))
    with pytest.raises(BurnishError, match=r"train_dataset\[0\]: a vision-language model "
                                           r"trains on rows with 'messages'"):
        Trainer(model, processor, [{"text": "hello"}], args=config(tmp_path))
    with pytest.raises(BurnishError, match="packing=True is not supported for vision"):
        Trainer(model, processor, rows, args=config(tmp_path, packing=True))
