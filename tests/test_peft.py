import json
import math
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from burnish.errors import BurnishError
from burnish.loading import from_pretrained
from burnish.peft import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    get_peft_model,
    is_gradient_checkpointed,
    peft_config,
)

PROJ = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def trainable(model):
    return [k for k, _ in tree_flatten(model.trainable_parameters())]


def test_named_targets_rank_scale_and_freezing(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    out = get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert out is model
    for block in model.layers:
        attn = block.self_attn
        assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.v_proj, LoRALinear)
        assert isinstance(attn.k_proj, nn.Linear) and not isinstance(attn.k_proj, LoRALinear)
        assert attn.q_proj.scale == 2.0  # lora_alpha / r: mlx-lm's multiplier
        assert attn.q_proj.lora_a.shape == (64, 4)
    names = trainable(model)
    assert len(names) == 2 * 2 * 2  # 2 blocks x (q, v) x (lora_a, lora_b)
    assert all(n.endswith(("lora_a", "lora_b")) for n in names)
    config = peft_config(model).adapter_config()
    assert config == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0,
                            "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
    }
    with pytest.raises(BurnishError, match="already has adapters"):
        get_peft_model(model)


def test_all_linear_excludes_head_and_norms_rslora_last_n(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    get_peft_model(model, r=4, lora_alpha=8, use_rslora=True, finetune_last_n_layers=1)
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, LoRALinear) for _, m in model.layers[0].named_modules())
    wrapped = sorted(k.split(".")[-1] for k, m in model.layers[1].named_modules()
                     if isinstance(m, LoRALinear))
    assert wrapped == PROJ
    assert model.layers[1].mlp.up_proj.scale == pytest.approx(8 / math.sqrt(4))
    names = trainable(model)
    assert len(names) == 7 * 2 and not any("norm" in n or "embed" in n for n in names)


def test_dora_and_qlora_layers(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    get_peft_model(model, r=4, use_dora=True, target_modules="q_proj")
    assert isinstance(model.layers[0].self_attn.q_proj, DoRALinear)
    assert sorted(n.split(".")[-1] for n in trainable(model)) == ["lora_a", "lora_a", "lora_b",
                                                                  "lora_b", "m", "m"]
    assert peft_config(model).adapter_config()["fine_tune_type"] == "dora"

    qmodel, _ = from_pretrained(model_factory("llama"), load_in_4bit=True)
    get_peft_model(qmodel, r=4)
    q = qmodel.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.linear, nn.QuantizedLinear)
    assert all(n.endswith(("lora_a", "lora_b")) for n in trainable(qmodel))


def test_unsloth_arguments_warn_and_unknown_ones_fail(model_factory):
    model, _ = from_pretrained(model_factory("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(model, r=4, bias="none", loftq_config=None, max_seq_length=512,
                       use_gradient_checkpointing="unsloth")
    text = " | ".join(str(w.message) for w in caught)
    for name in ("bias", "loftq_config", "max_seq_length", "unsloth"):
        assert name in text
    assert peft_config(model).gradient_checkpointing
    assert all(is_gradient_checkpointed(b) for b in model.layers)

    fresh, _ = from_pretrained(model_factory("llama"))
    with pytest.raises(TypeError, match="unknown argument.*lora_rank"):
        get_peft_model(fresh, lora_rank=4)
    with pytest.raises(BurnishError, match="bias='all' is not supported"):
        get_peft_model(fresh, bias="all")
    with pytest.raises(BurnishError, match="no linear layer named 'qkv'.*q_proj"):
        get_peft_model(fresh, target_modules=["q_proj", "qkv"])
    with pytest.raises(BurnishError, match="finetune_last_n_layers=5"):
        get_peft_model(fresh, finetune_last_n_layers=5)
    assert peft_config(fresh) is None  # nothing happened on failure
    assert trainable(fresh) == []


def test_gradient_checkpointing_is_per_instance_and_exact(model_factory):
    path = model_factory("llama", dtype=mx.float32)
    model, _ = from_pretrained(path)
    other, _ = from_pretrained(path)
    get_peft_model(model, r=4)
    get_peft_model(other, r=4)
    x = mx.array([[1, 5, 9, 13, 17, 21, 4, 8]])

    def loss(m):
        return m(x).astype(mx.float32).square().mean()

    for m in (model, other):
        m.train()
        m.layers[0].self_attn.q_proj.lora_b = mx.full((4, 64), 0.01)
    plain_value, plain_grads = nn.value_and_grad(other, loss)(other)
    shared = type(model.layers[0])
    changed = enable_gradient_checkpointing(model)
    assert len(changed) == 2 and type(model.layers[0]) is not shared
    assert type(other.layers[0]) is shared and shared.__call__ is not type(model.layers[0]).__call__
    value, grads = nn.value_and_grad(model, loss)(model)
    assert mx.allclose(value, plain_value, atol=1e-6).item()
    for (k, g), (_, h) in zip(tree_flatten(grads), tree_flatten(plain_grads)):
        assert mx.allclose(g, h, atol=1e-6).item(), k
    disable_gradient_checkpointing(model)
    assert type(model.layers[0]) is shared


def test_adapter_config_loads_in_stock_mlx_lm(model_factory, tmp_path):
    import mlx_lm

    path = model_factory("llama")
    model, _ = from_pretrained(path)
    get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                   finetune_last_n_layers=1)
    mx.random.seed(1)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape)
    adapters = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), adapters)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(peft_config(model).adapter_config()))
    stock, _ = mlx_lm.load(str(path), adapter_path=str(tmp_path))
    x = mx.array([[1, 2, 3, 4, 5]])
    assert mx.array_equal(model(x), stock(x)).item()
