"""get_peft_model: HF PEFT's target matching, freezing and parameter counts on GPT-2."""

from __future__ import annotations

import numpy as np
import pytest

from minipeft import backend
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.peft import (
    IA3Config,
    LoraConfig,
    LoraLayer,
    VeraConfig,
    apply_bitfit,
    get_peft_model,
)
from minipeft.peft.config import config_from_dict, get_pattern_key, target_matches

CFG = {"vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}


def _gpt2():
    backend.seed(0)
    return GPT2(GPT2Config(**CFG))


def test_target_matching_follows_hf_rules():
    assert target_matches(["c_attn"], "transformer.h.0.attn.c_attn")
    assert not target_matches(["attn"], "transformer.h.0.attn.c_attn")  # suffix after a dot
    assert target_matches(["c_attn"], "c_attn")
    assert target_matches(r".*\.0\.attn\.c_attn", "transformer.h.0.attn.c_attn")  # full regex
    assert not target_matches(r"c_attn", "transformer.h.0.attn.c_attn")
    assert get_pattern_key(["c_fc", "h.1.attn.c_attn"], "transformer.h.1.attn.c_attn") == (
        "h.1.attn.c_attn"
    )
    assert get_pattern_key(["fc"], "transformer.h.1.mlp.c_fc") is None


def test_wraps_conv1d_freezes_everything_else_and_honours_rank_pattern():
    model = get_peft_model(
        _gpt2(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
            rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"c_attn": 2},
        ),
    )  # fmt: skip
    layers = dict(model.adapter_layers())
    assert sorted(layers) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
    )
    assert all(isinstance(v, LoraLayer) and v.fan_in_fan_out for v in layers.values())
    assert layers["transformer.h.1.mlp.c_fc"].r["default"] == 2
    assert layers["transformer.h.0.mlp.c_fc"].r["default"] == 4
    assert layers["transformer.h.0.attn.c_attn"].scaling["default"] == 0.5  # α=2 / r=4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # C=16: c_attn 16→48 r=4: 4·16 + 48·4 = 256; c_fc 16→64: r=4 → 320, r=2 → 160
    assert model.get_nb_trainable_parameters()[0] == 2 * 256 + 320 + 160


def test_print_trainable_parameters_matches_hf_peft(capsys):
    torch = pytest.importorskip("torch", reason="cross-check needs PyTorch")
    transformers = pytest.importorskip("transformers", reason="cross-check needs transformers")
    peft = pytest.importorskip("peft", reason="cross-check needs HF PEFT")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    cases = [
        (peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
         LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
        (peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
         LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
        (peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
         VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        (peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                        fan_in_fan_out=True),
         IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                   fan_in_fan_out=True)),
    ]  # fmt: skip
    for hf_config, our_config in cases:
        hf = peft.get_peft_model(transformers.GPT2LMHeadModel(hf_cfg), hf_config)
        hf.print_trainable_parameters()
        expected = capsys.readouterr().out.strip()
        line = get_peft_model(_gpt2(), our_config).print_trainable_parameters()
        assert capsys.readouterr().out.strip() == line == expected


def test_bias_options_and_bitfit():
    m = get_peft_model(
        _gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")
    )
    extra = [n for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n]
    assert extra == [
        f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)
    ]
    model = _gpt2()
    trainable, total = apply_bitfit(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(".bias") for n in names)
    assert trainable == sum(p.size for n, p in model.named_parameters() if n.endswith(".bias"))
    assert total == sum(p.size for p in model.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only layers with a 2-D weight"):
        get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["ln_1"]))
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(r=2)
    with pytest.raises(ValueError, match="modules_to_save"):
        config_from_dict({"peft_type": "LORA", "target_modules": ["c_attn"],
                          "modules_to_save": ["lm_head"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown adapter_config\.json field"):
        config_from_dict({"peft_type": "LORA", "target_modules": ["c_attn"], "zzz": 1})


def test_peft_model_trains_and_merges_on_gpt2():
    model = get_peft_model(
        _gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                            init_lora_weights=False)
    )  # fmt: skip
    model.eval()
    ids = np.array([[1, 2, 3, 4]])
    loss = model.loss(ids)  # attributes the wrapper lacks come from the base model
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    y = model(ids).data
    with model.disable_adapter():
        y_base = model(ids).data
    assert np.abs(y - y_base).max() > 1e-4
    merged = model.merge_and_unload()
    np.testing.assert_allclose(merged(ids).data, y, atol=1e-5)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_loraplus_groups_give_b_the_larger_rate_errata_10():
    from minipeft.optim import AdamW
    from minipeft.peft import loraplus_param_groups

    model = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert groups[1]["lr"] == 16 * groups[0]["lr"]
    opt = AdamW(groups)
    loss = model.get_base_model().loss(np.array([[1, 2, 3, 4]]))
    loss.backward()
    opt.step()  # B moves from 0 by ≈ η_B per entry (Adam's first step is ±η)
    b = next(p for p in groups[1]["params"])
    assert np.isclose(np.abs(b.data).max(), 16e-3, rtol=1e-3)
