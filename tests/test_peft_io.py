"""HF PEFT adapter files both ways, cross-checked against HF PEFT on a small random GPT-2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minipeft.autograd.tensor import no_grad
from minipeft.models.gpt2 import GPT2
from minipeft.peft import IA3Config, LoraConfig, PeftModel, VeraConfig, get_peft_model
from minipeft.peft.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter

IDS = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random HF GPT-2 saved to disk (the shared base model of both libraries)."""
    torch = pytest.importorskip("torch", reason="cross-check needs PyTorch")
    transformers = pytest.importorskip("transformers", reason="cross-check needs transformers")
    pytest.importorskip("peft", reason="cross-check needs HF PEFT")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("base")
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    return path


def _hf_model(path):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def _hf_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _our_logits(model):
    model.eval()
    with no_grad():
        return model(IDS).data


def _hf_configs():
    import peft

    common = {"fan_in_fan_out": True}
    return {
        "lora": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
            rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 3}, **common,
        ),
        "rslora": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
            use_rslora=True, **common,
        ),
        "dora": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False,
            use_dora=True, **common,
        ),
        "vera": peft.VeraConfig(
            r=4, target_modules=["c_attn", "c_fc"], init_weights=False, **common
        ),
        "vera_noproj": peft.VeraConfig(
            r=4, target_modules=["c_attn"], init_weights=False, save_projection=False, **common
        ),
        "ia3": peft.IA3Config(
            target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
            init_ia3_weights=False, **common,
        ),
        # PiSSA changes the base weights at creation; loading re-runs it on the base, as
        # HF PEFT does, so the residual W₀' plus the loaded s·B·A reproduce HF's model.
        "pissa": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="pissa",
            **common,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera", "vera_noproj", "ia3", "pissa"])
def test_hf_adapter_loads_into_minipeft(hf_base, tmp_path, kind):
    import peft

    hf = peft.get_peft_model(_hf_model(hf_base), _hf_configs()[kind])
    if kind.startswith("vera"):  # give the trainable vectors non-trivial values
        import torch

        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "lambda" in n:
                    p.copy_(torch.randn_like(p))
    if kind == "pissa":  # train-like change of the adapter so that ΔW ≠ the initial one
        import torch

        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "lora_B" in n:
                    p.mul_(1.5)
    hf.save_pretrained(tmp_path)
    ref = _hf_logits(hf)
    ours = PeftModel.from_pretrained(GPT2.from_pretrained(hf_base, dtype=np.float32), tmp_path)
    base_logits = _hf_logits(_hf_model(hf_base))
    assert np.abs(ref - base_logits).max() > 1e-3  # the adapter changes the output
    np.testing.assert_allclose(_our_logits(ours), ref, atol=2e-5, rtol=1e-4)


def _our_configs():
    common = {"fan_in_fan_out": True}
    return {
        "lora": LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
            rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 3}, **common,
        ),
        "dora": LoraConfig(
            r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], init_lora_weights=False,
            use_dora=True, use_rslora=True, **common,
        ),
        "vera": VeraConfig(r=4, target_modules=["c_attn", "c_fc"], init_weights=False, **common),
        "ia3": IA3Config(
            target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
            init_ia3_weights=False, **common,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["lora", "dora", "vera", "ia3"])
def test_minipeft_adapter_loads_into_hf(hf_base, tmp_path, kind):
    import peft

    ours = get_peft_model(GPT2.from_pretrained(hf_base, dtype=np.float32), _our_configs()[kind])
    rng = np.random.default_rng(1)
    for n, p in ours.named_parameters():
        if p.requires_grad:  # random adapter values, so the check is not trivially ΔW = 0
            p.data[...] = rng.normal(1.0 if "ia3" in n else 0.0, 0.3, p.shape)
    ours.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(_hf_model(hf_base), tmp_path).eval()
    np.testing.assert_allclose(_hf_logits(hf), _our_logits(ours), atol=2e-5, rtol=1e-4)


def test_saved_names_and_shapes_match_hf(tmp_path):
    """Keys carry no adapter name; shapes as HF PEFT: A (r, in), B (out, r), m (out,)."""
    from safetensors.numpy import load_file

    from minipeft.models.gpt2 import GPT2Config

    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ours = get_peft_model(
        GPT2(cfg), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)
    )
    ours.save_pretrained(tmp_path)
    shapes = {k: v.shape for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    pre = "base_model.model.transformer.h.0.attn.c_attn."
    assert shapes == {
        pre + "lora_A.weight": (2, 16),
        pre + "lora_B.weight": (48, 2),
        pre + "lora_magnitude_vector": (48,),
    }
    conf = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert conf["peft_type"] == "LORA" and conf["use_dora"] is True and conf["r"] == 2


def _small_gpt2():
    from minipeft.models.gpt2 import GPT2Config

    return GPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def test_load_errors_are_clear_and_leave_the_model_unwrapped(tmp_path):
    from safetensors.numpy import load_file, save_file

    ours = get_peft_model(_small_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)

    bad = dict(tensors)
    bad["base_model.model.transformer.h.0.attn.c_attn.lora_X.weight"] = np.zeros(2, np.float32)
    save_file(bad, tmp_path / WEIGHTS_NAME)
    model = _small_gpt2()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_adapter(model, tmp_path)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # unwrapped again
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())

    short = {k: v for k, v in tensors.items() if "lora_B" not in k}
    save_file(short, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="missing tensors"):
        load_adapter(_small_gpt2(), tmp_path)

    wrong = {k: (v[:1] if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(wrong, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_adapter(_small_gpt2(), tmp_path)

    save_file(tensors, tmp_path / WEIGHTS_NAME)
    conf = json.loads((tmp_path / CONFIG_NAME).read_text())
    conf["layers_to_transform"] = [0]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="layers_to_transform"):
        load_adapter(_small_gpt2(), tmp_path)
    conf["layers_to_transform"] = None
    conf["peft_type"] = "PREFIX_TUNING"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="peft_type"):
        load_adapter(_small_gpt2(), tmp_path)


def test_save_leaves_no_partial_file(tmp_path, monkeypatch):
    """A failure while writing leaves no adapter file (temporary file + rename)."""
    import safetensors.numpy

    ours = get_peft_model(_small_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_logits_cli_with_adapter(hf_base, tmp_path):
    """python -m minipeft logits --model DIR --adapter DIR gives HF PEFT's logits."""
    import peft

    from minipeft.__main__ import main

    hf = peft.get_peft_model(_hf_model(hf_base), _hf_configs()["dora"])
    hf.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "logits.npy"
    ids = "1,2,3,4,5,6"
    rc = main(["logits", "--model", str(hf_base), "--adapter", str(tmp_path / "adapter"),
               "--ids", ids, "--out", str(out)])  # fmt: skip
    assert rc == 0
    np.testing.assert_allclose(
        np.load(out, allow_pickle=False), _hf_logits(hf)[0], atol=2e-5, rtol=1e-4
    )
    bad = main(["logits", "--model", str(hf_base), "--adapter", str(tmp_path / "nowhere"),
                "--ids", ids, "--out", str(out)])  # fmt: skip
    assert bad != 0


def test_two_named_adapters_both_ways(hf_base, tmp_path):
    """A second adapter goes to DIR/<name> (HF PEFT's layout) and switches the same way."""
    import peft

    ours = get_peft_model(
        GPT2.from_pretrained(hf_base, dtype=np.float32),
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    ours.add_adapter(
        "task2",
        LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                   init_lora_weights=False),
    )  # fmt: skip
    ours.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "task2" / WEIGHTS_NAME).is_file()
    hf = peft.PeftModel.from_pretrained(_hf_model(hf_base), tmp_path)
    hf.load_adapter(tmp_path / "task2", adapter_name="task2")
    back = PeftModel.from_pretrained(GPT2.from_pretrained(hf_base, dtype=np.float32), tmp_path)
    back.load_adapter(str(tmp_path / "task2"), "task2")
    for name in ("default", "task2"):
        ours.set_adapter(name)
        hf.set_adapter(name)
        back.set_adapter(name)
        np.testing.assert_allclose(_hf_logits(hf.eval()), _our_logits(ours), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(_our_logits(back), _our_logits(ours), atol=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        back.load_adapter(str(tmp_path / "task2"), "task2")
