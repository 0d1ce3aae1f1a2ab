"""The stateful PEFT paths under bad use (issue 15): merged set_adapter, adapter names,
config fields, all-or-nothing injection, bounded target matching, delete_adapter and
AdaLoRA's step."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest

from minipeft import backend
from minipeft.backend import to_numpy
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.peft import IA3Config, LoraConfig, LoraLayer, VeraConfig, get_peft_model
from minipeft.peft.adalora import AdaLoraConfig
from minipeft.peft.config import check_adapter_name, target_matches
from minipeft.peft.inject import PeftModel, UnknownAdapterError

CFG = {"vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}
IDS = np.array([[1, 2, 3, 4, 5]])


def _gpt2() -> GPT2:
    backend.seed(0)
    return GPT2(GPT2Config(**CFG)).eval()


def _logits(model) -> np.ndarray:
    return to_numpy(model(IDS).data).copy()


def _snapshot(model) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Parameter names, values and requires_grad flags (names change if a layer is wrapped)."""
    params = dict(model.named_parameters())
    return {n: to_numpy(p.data).copy() for n, p in params.items()}, {
        n: p.requires_grad for n, p in params.items()
    }


def _two_lora(model=None) -> PeftModel:
    pm = get_peft_model(
        model or _gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False), "a"
    )
    pm.add_adapter("b", LoraConfig(r=3, target_modules=["c_attn"], init_lora_weights=False))
    return pm


# ------------------------------------------------------------------ 1. set_adapter when merged
def test_set_adapter_on_a_merged_model_unmerges_and_gives_the_new_adapters_output():
    pm = _two_lora()
    pm.set_adapter("b")
    want_b = _logits(pm)
    pm.set_adapter("a")
    want_a = _logits(pm)
    assert not np.allclose(want_a, want_b)
    pm.merge_adapter()
    np.testing.assert_allclose(_logits(pm), want_a, atol=1e-5)
    with pytest.warns(UserWarning, match="unmerging them first"):
        pm.set_adapter("b")
    assert not any(layer.merged for _, layer in pm.adapter_layers())
    np.testing.assert_allclose(_logits(pm), want_b, atol=1e-5)
    pm.set_adapter("a")  # nothing merged any more: no warning, a's output again
    np.testing.assert_allclose(_logits(pm), want_a, atol=1e-5)


def test_lora_layer_set_adapter_unmerges_other_merged_adapters():
    pm = _two_lora()
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    w0 = to_numpy(layer.base_layer.weight.data).copy()
    layer.set_adapter("a")
    layer.merge()
    with pytest.warns(UserWarning, match="merged into this layer"):
        layer.set_adapter("b")
    assert not layer.merged
    np.testing.assert_allclose(to_numpy(layer.base_layer.weight.data), w0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.merge()
        layer.set_adapter("b")  # the merged adapter stays the active one: nothing to undo
    assert layer.merged


# ------------------------------------------------------------------ 2. adapter names
BAD_NAMES = ["task.v2", "../x", "/tmp/x", "a/b", "a\\b", "..", "", " a", "-a", "training"]
BAD_NAMES += ["x" * 101, "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=2, target_modules=["c_attn"]),
        IA3Config(target_modules=["c_attn"]),
        VeraConfig(r=2, target_modules=["c_attn"]),
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["c_attn"]),
    ],
    ids=["lora", "ia3", "vera", "adalora"],
)
def test_every_tuner_refuses_a_bad_name_before_touching_the_model(name, config):
    model = _gpt2()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_name: "):
        get_peft_model(model, config, name)
    after = _snapshot(model)
    assert after[1] == before[1]  # same names (nothing wrapped) and same flags


def test_names_that_pass_and_a_non_string():
    for ok in ("default", "task_v2", "Aufgabe-2", "x" * 100):
        assert check_adapter_name(ok) == ok
    with pytest.raises(TypeError, match="adapter_name: expected a string"):
        check_adapter_name(3)


def test_save_pretrained_stays_inside_its_directory(tmp_path):
    pm = get_peft_model(_gpt2(), IA3Config(target_modules=["c_attn"]), "task_v2")
    pm.save_pretrained(str(tmp_path / "out"))
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "out" / "task_v2" / "adapter_model.safetensors"))
    assert len(saved) == 2  # one ia3_l per adapted layer, not an empty file
    with pytest.raises(UnknownAdapterError, match=r"no adapter '\.\./x'"):
        pm.save_pretrained(str(tmp_path / "out"), selected_adapters=["../x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ 3. config fields
@pytest.mark.parametrize(
    ("field", "value", "error", "fragment"),
    [
        ("lora_alpha", math.nan, ValueError, "lora_alpha: expected a finite number"),
        ("lora_alpha", math.inf, ValueError, "lora_alpha: expected a finite number"),
        ("lora_alpha", -8, ValueError, "lora_alpha: expected a number in (0.0"),
        ("r", True, TypeError, "r: expected an integer"),
        ("r", 4.0, TypeError, "r: expected an integer"),
        ("lora_dropout", 1.5, ValueError, "lora_dropout: expected a number in [0.0, 1.0)"),
        ("use_rslora", "yes", TypeError, "use_rslora: expected true or false"),
    ],
)
def test_adapter_config_json_with_a_bad_field_fails_on_load_naming_field_and_file(
    tmp_path, field, value, error, fragment
):
    pm = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    d = json.loads(path.read_text())
    d[field] = value
    path.write_text(json.dumps(d))  # json writes NaN and Infinity, as Python's json reads them
    model = _gpt2()
    before = _snapshot(model)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(model, str(tmp_path))
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert _snapshot(model)[1] == before[1]


def test_integer_or_nan_tensors_in_the_adapter_file_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    pm = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(str(tmp_path))
    wpath = tmp_path / "adapter_model.safetensors"
    good = load_file(str(wpath))
    key = sorted(good)[0]
    for bad, fragment in (
        (good[key].astype(np.int32), "expected a floating dtype, got int32"),
        (np.full_like(good[key], np.nan), "NaN or infinite"),
    ):
        save_file({**good, key: bad}, str(wpath))
        model = _gpt2()
        y = _logits(model)
        with pytest.raises(ValueError, match=fragment):
            PeftModel.from_pretrained(model, str(tmp_path))
        np.testing.assert_array_equal(_logits(model), y)


def test_rank_above_the_layer_size_warns_as_peft_accepts_it():
    # c_attn is 16 → 48: min(in, out) = 16
    with pytest.warns(UserWarning, match="r: rank 20 exceeds min\\(in, out\\) = 16"):
        pm = get_peft_model(_gpt2(), LoraConfig(r=20, target_modules=["c_attn"]))
    assert pm.base_model.model.transformer.h[0].attn.c_attn.r["default"] == 20


# ------------------------------------------------------------------ 4. all or nothing
def test_a_failure_half_way_through_injection_leaves_the_model_untouched(monkeypatch, tmp_path):
    model = _gpt2()
    y = _logits(model)
    values, flags = _snapshot(model)
    calls = {"n": 0}
    real = LoraLayer.add_adapter

    def fail_on_second_layer(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated failure on the second layer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "add_adapter", fail_on_second_layer)
    with pytest.raises(MemoryError):
        get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    assert calls["n"] == 2  # it did fail part-way, after wrapping a layer
    monkeypatch.undo()
    after_values, after_flags = _snapshot(model)
    assert after_flags == flags
    for n, v in values.items():
        np.testing.assert_array_equal(after_values[n], v)
    np.testing.assert_array_equal(_logits(model), y)
    # a checkpoint saved after the failure reloads into a fresh model with the same outputs
    model.save_pretrained(tmp_path / "ckpt")
    again = GPT2.from_pretrained(tmp_path / "ckpt")
    np.testing.assert_allclose(_logits(again), y, atol=1e-6)


def test_a_failed_pissa_injection_puts_the_base_weights_back(monkeypatch):
    model = _gpt2()
    y = _logits(model)
    real = LoraLayer.add_adapter
    seen = []

    def fail_after_first(self, *args, **kwargs):
        real(self, *args, **kwargs)  # PiSSA has rewritten W₀ of this layer
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("simulated")

    monkeypatch.setattr(LoraLayer, "add_adapter", fail_after_first)
    with pytest.raises(RuntimeError):
        get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="pissa"))
    np.testing.assert_array_equal(_logits(model), y)


def test_a_failed_second_adapter_leaves_the_first_as_it_was(monkeypatch):
    pm = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), "a")
    flags = _snapshot(pm)[1]
    monkeypatch.setattr(LoraLayer, "add_adapter", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pm.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    monkeypatch.undo()
    assert list(pm.peft_config) == ["a"] and pm.active_adapter == "a"
    assert _snapshot(pm)[1] == flags
    assert all("b" not in layer.r for _, layer in pm.adapter_layers())


@pytest.mark.parametrize(
    ("config", "name", "error"),
    [
        (LoraConfig(r=2, target_modules=["c_attn"]), "a.b", ValueError),
        (LoraConfig(r=2, target_modules=["c_attn", "wte"]), "default", ValueError),
        ({"r": 2, "target_modules": ["c_attn"]}, "default", TypeError),
    ],
    ids=["bad-name", "non-linear-target", "dict-not-config"],
)
def test_bad_arguments_leave_the_model_untouched(config, name, error, tmp_path):
    model = _gpt2()
    y = _logits(model)
    flags = _snapshot(model)[1]
    with pytest.raises(error):
        get_peft_model(model, config, name)
    assert _snapshot(model)[1] == flags
    np.testing.assert_array_equal(_logits(model), y)
    model.save_pretrained(tmp_path / "ckpt")
    np.testing.assert_allclose(_logits(GPT2.from_pretrained(tmp_path / "ckpt")), y, atol=1e-6)


def test_vera_and_adalora_roll_back_their_shared_state(monkeypatch):
    from minipeft.peft import vera

    model = _gpt2()
    flags = _snapshot(model)[1]
    real = vera.VeraLayer.__init__
    seen = []

    def fail_second(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("simulated")
        real(self, *args, **kwargs)

    monkeypatch.setattr(vera.VeraLayer, "__init__", fail_second)
    with pytest.raises(RuntimeError):
        get_peft_model(model, VeraConfig(r=2, target_modules=["c_attn"]))
    assert _snapshot(model)[1] == flags


# ------------------------------------------------------------------ 5. bounded matching
def test_a_pathological_target_regex_returns_quickly():
    name = "transformer.h.0.attn.c_attn" + "a" * 40  # Python's re needs ~2^40 steps here
    t0 = time.perf_counter()
    assert not target_matches("(.*.*)*!", name)
    model = _gpt2()
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(model, LoraConfig(r=2, target_modules="(.*.*)*!"))
    assert time.perf_counter() - t0 < 5.0


def test_a_pattern_re2_cannot_run_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"target_modules: .* backreferences"):
        LoraConfig(target_modules=r"(c_attn)\1")
    with pytest.raises(ValueError, match=r"target_modules: .*lookaround"):
        IA3Config(target_modules=r"(?!x).*c_attn")
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraConfig(target_modules=["c_attn"], rank_pattern={"(?=x)": 2})


def test_regex_semantics_are_hf_peft_fullmatch():
    assert target_matches(r".*\.(c_attn|c_fc)", "transformer.h.1.mlp.c_fc")
    assert not target_matches(r"c_attn", "transformer.h.0.attn.c_attn")  # whole name


# ------------------------------------------------------------------ 6. delete_adapter
def test_delete_adapter_removes_its_tensors_and_keeps_the_other():
    pm = _two_lora()
    pm.set_adapter("a")
    y_a = _logits(pm)
    pm.delete_adapter("b")
    assert list(pm.peft_config) == ["a"]
    assert not any(".b." in n for n, _ in pm.named_parameters())
    np.testing.assert_allclose(_logits(pm), y_a, atol=1e-6)


def test_delete_the_active_adapter_activates_the_first_remaining_one():
    pm = _two_lora()
    pm.set_adapter("b")
    with pytest.warns(UserWarning, match="activating 'a'"):
        pm.delete_adapter("b")
    assert pm.active_adapter == "a"
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)


def test_delete_adapter_errors():
    pm = _two_lora()
    with pytest.raises(ValueError, match="no adapter 'c'"):
        pm.delete_adapter("c")
    with pytest.raises(KeyError):  # UnknownAdapterError is both
        pm.delete_adapter("c")
    pm.merge_adapter()  # merges the active "a"
    with pytest.raises(ValueError, match="'a' is merged"):
        pm.delete_adapter("a")
    pm.unmerge_adapter()
    pm.delete_adapter("b")
    with pytest.raises(ValueError, match="only adapter"):
        pm.delete_adapter("a")
    single = get_peft_model(_gpt2(), IA3Config(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="only adapter"):
        single.delete_adapter("default")


# ------------------------------------------------------------------ 7. AdaLoRA's step
@pytest.mark.parametrize(
    ("step", "error"), [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_update_and_allocate_refuses_a_bad_step(step, error):
    pm = get_peft_model(
        _gpt2(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["c_attn"])
    )
    with pytest.raises(error, match="global_step: expected an integer ≥ 0"):
        pm.update_and_allocate(step)
    with pytest.raises(error, match="step: expected an integer ≥ 0"):
        pm.rankallocator.update_and_allocate(step)
    assert pm.rankallocator.rank_pattern is None and pm.rankallocator.state == {}
