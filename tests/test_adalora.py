"""AdaLoRA: the SVD update, PEFT's regularizer, the schedule, and equivalence with HF PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft
from minipeft.autograd import Tensor, gradcheck, matmul, transpose
from minipeft.nn import Linear
from minipeft.peft.adalora import (
    AdaLoraConfig,
    RankAllocator,
    SVDLinear,
    budget_schedule,
    orthogonal_penalty,
    prune_to_rank_pattern,
    svd_delta,
    triplet_scores,
)


def _cfg(**kw):
    base = dict(target_r=2, init_r=4, tinit=3, tfinal=4, deltaT=2, total_step=20,
                target_modules=["fc"])  # fmt: skip
    base.update(kw)
    return AdaLoraConfig(**base)


@given(
    n=st.integers(1, 5), d_in=st.integers(1, 6), d_out=st.integers(1, 6), r=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_svd_delta_gradients_match_finite_differences(n, d_in, d_out, r, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in [(n, d_in), (r, d_in), (r, 1), (d_out, r)]]
    res = gradcheck(lambda x, a, e, b: svd_delta(x, a, e, b, 0.7), arrays)
    assert res.max_rel_error < 1e-6, res


def test_svd_delta_equals_peft_formula_and_composition():
    rng = np.random.default_rng(0)
    x, a, e, b = (rng.standard_normal(s) for s in [(2, 3, 5), (4, 5), (4, 1), (6, 4)])
    y = svd_delta(Tensor(x), Tensor(a), Tensor(e), Tensor(b), 1.5).data
    np.testing.assert_allclose(y, x @ (a * e).T @ b.T * 1.5, rtol=1e-13)
    # the same gradient as the composition of primitive ops
    ts = [Tensor(v, requires_grad=True) for v in (x, a, e, b)]
    svd_delta(*ts, 1.5).sum().backward()
    ts2 = [Tensor(v, requires_grad=True) for v in (x, a, e, b)]
    ref = matmul(matmul(ts2[0], transpose(ts2[1] * ts2[2], (1, 0))), transpose(ts2[3], (1, 0)))
    (ref * 1.5).sum().backward()
    for t, t2 in zip(ts, ts2):
        np.testing.assert_allclose(t.grad, t2.grad, rtol=1e-12, atol=1e-14)


def test_frozen_inputs_get_no_gradient():
    minipeft.seed(0)
    with minipeft.dtype_policy("float64"):
        layer = SVDLinear(Linear(5, 3), r=4, lora_alpha=8)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 5)))
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert x.grad is None
    for p in (layer.A, layer.E, layer.B):
        assert p.grad is not None


def test_lambda_starts_at_zero_so_the_update_is_zero():
    with minipeft.dtype_policy("float64"):
        layer = SVDLinear(Linear(5, 3), r=4, lora_alpha=8)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 5)))
    np.testing.assert_array_equal(layer(x).data, layer.base_layer(x).data)
    assert np.all(layer.delta_weight() == 0)


@given(r=st.integers(1, 5), d=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_orthogonal_penalty_gradient(r, d, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((r, d)), rng.standard_normal((d, r))
    res = gradcheck(lambda a, b: orthogonal_penalty([a], [b]), [a, b])
    assert res.max_rel_error < 1e-6, res
    # value: PEFT's mean of unsquared Frobenius norms
    want = (np.linalg.norm(a @ a.T - np.eye(r)) + np.linalg.norm(b.T @ b - np.eye(r))) / 2
    assert orthogonal_penalty([Tensor(a)], [Tensor(b)]).item() == pytest.approx(want, rel=1e-12)


def test_orthogonal_penalty_is_zero_on_orthonormal_factors():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 3)))
    assert orthogonal_penalty([Tensor(q.T)], [Tensor(q)]).item() < 1e-14


def test_budget_schedule_phases():
    cfg = _cfg(tinit=3, tfinal=4, total_step=20, deltaT=2)
    b0, bt = 12, 6
    assert budget_schedule(3, cfg, b0, bt) == (12, False)  # warm-up
    assert budget_schedule(17, cfg, b0, bt) == (6, True)  # final phase
    # cubic in between: t = 10 → mul = 1 − 7/13
    want = int((b0 - bt) * (1 - 7 / 13) ** 3 + bt)
    assert budget_schedule(10, cfg, b0, bt) == (want, True)
    assert budget_schedule(11, cfg, b0, bt)[1] is False


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(target_r=8, init_r=4), "target_r"),
        (dict(total_step=7, tinit=3, tfinal=4), "total_step"),
        (dict(deltaT=0), "deltaT"),
        (dict(beta1=1.0), "beta1"),
        (dict(total_step=None), "total_step"),
    ],
)
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_triplet_score_definition():
    sa = np.arange(6.0).reshape(2, 3)
    se = np.array([[10.0], [20.0]])
    sb = np.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(triplet_scores(sa, se, sb), [10 + 1 + 3, 20 + 4 + 4])


def test_prune_to_rank_pattern_keeps_the_update():
    with minipeft.dtype_policy("float64"):
        layer = SVDLinear(Linear(5, 3), r=4, lora_alpha=8)
    layer.E.data[:] = [[1.0], [0.0], [2.0], [0.0]]
    kept = prune_to_rank_pattern(layer, [True, False, True, False])
    assert kept["lora_A"].shape == (2, 5) and kept["lora_B"].shape == (3, 2)
    full = layer.B.data @ (layer.A.data * layer.E.data)
    np.testing.assert_allclose(kept["lora_B"] @ (kept["lora_A"] * kept["lora_E"]), full)


# ---------------------------------------------------------------------------- HF PEFT
def test_rank_allocation_equals_hf_peft():
    """Same parameters and gradients, many steps: budgets, scores, masks, rank patterns agree."""
    torch = pytest.importorskip("torch", reason="torch is needed to run HF PEFT's allocator")
    peft = pytest.importorskip("peft", reason="peft is needed for the equivalence test")

    total, tinit, tfinal, delta_t = 30, 4, 6, 3
    init_r, target_r = 5, 2
    dims = {"fc1": (7, 6), "fc2": (6, 4), "fc3": (4, 5)}  # name: (in, out)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (i, o) in dims.items():
                setattr(self, name, torch.nn.Linear(i, o))

    torch.manual_seed(0)
    hf_cfg = peft.AdaLoraConfig(
        target_modules=list(dims), init_r=init_r, target_r=target_r, tinit=tinit,
        tfinal=tfinal, deltaT=delta_t, total_step=total, lora_alpha=8,
    )  # fmt: skip
    hf = peft.get_peft_model(Tiny().double(), hf_cfg)
    mp_cfg = AdaLoraConfig(
        target_modules=list(dims),
        init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        total_step=total, lora_alpha=8,
    )  # fmt: skip
    layers = {}
    with minipeft.dtype_policy("float64"):
        for name, (i, o) in dims.items():
            layers[name] = SVDLinear(Linear(i, o), r=init_r, lora_alpha=8)
    hf_params = dict(hf.named_parameters())

    def hf_param(name, kind):
        return hf_params[f"base_model.model.{name}.{kind}.default"]

    rng = np.random.default_rng(1)
    for name, layer in layers.items():  # identical starting values, Λ non-zero to be ranked
        for kind in ("lora_A", "lora_E", "lora_B"):
            val = rng.standard_normal(layer.param(kind).shape)
            layer.param(kind).data[...] = val
            with torch.no_grad():
                hf_param(name, kind).copy_(torch.from_numpy(val))
    alloc = RankAllocator(layers, mp_cfg)
    hf_alloc = hf.base_model.rankallocator
    assert alloc.init_budget == hf_alloc.init_bgt and alloc.target_budget == hf_alloc.target_bgt

    n_masked_steps = n_pattern_checks = 0
    for step in range(total + 3):
        for name, layer in layers.items():  # the same gradients on both sides
            for kind in ("lora_A", "lora_E", "lora_B"):
                g = rng.standard_normal(layer.param(kind).shape)
                layer.param(kind).grad = g
                hf_param(name, kind).grad = torch.from_numpy(g.copy())
        _, pattern = alloc.update_and_allocate(step)
        hf.base_model.update_and_allocate(step)
        n_masked_steps += pattern is not None
        if step < total - tfinal:  # scores exist during the budgeting phases
            for name in layers:
                for kind in ("lora_A", "lora_E", "lora_B"):
                    key = f"{name}.{kind}.default"  # HF's allocator sees the inner model
                    np.testing.assert_allclose(
                        alloc.element_score(f"{name}.{kind}"),
                        hf_alloc._element_score(key).numpy(), rtol=1e-12, atol=1e-300,
                    )  # fmt: skip
        for name, layer in layers.items():
            np.testing.assert_array_equal(layer.E.data, hf_param(name, "lora_E").detach().numpy())
        hf_rank_pattern = hf.peft_config["default"].rank_pattern
        assert (hf_rank_pattern is None) == (alloc.rank_pattern is None), step
        if hf_rank_pattern is not None:
            hf_pattern = {k.split(".lora_E")[0]: v for k, v in hf_rank_pattern.items()}
            assert hf_pattern == alloc.rank_pattern, step
            n_pattern_checks += 1
        # a plain SGD step on both sides keeps masked values able to recover
        for name, layer in layers.items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                p = layer.param(kind)
                p.data -= 0.01 * p.grad
                with torch.no_grad():
                    hf_param(name, kind).copy_(torch.from_numpy(p.data))
    assert n_masked_steps >= 4 and n_pattern_checks >= 10
    final = {name: sum(k) for name, k in alloc.rank_pattern.items()}
    assert sum(final.values()) == target_r * len(dims), final


# ---------------------------------------------------------------------------- files and model
def test_adalora_files_move_both_ways_with_hf_peft(tmp_path):
    """HF PEFT → minipeft and minipeft → HF PEFT, with a pruned rank pattern, same logits."""
    torch = pytest.importorskip("torch", reason="cross-check needs PyTorch")
    transformers = pytest.importorskip("transformers", reason="cross-check needs transformers")
    peft = pytest.importorskip("peft", reason="cross-check needs HF PEFT")
    from minipeft.autograd.tensor import no_grad
    from minipeft.models.gpt2 import GPT2
    from minipeft.peft import PeftModel
    from minipeft.peft.inject import get_peft_model

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    transformers.GPT2LMHeadModel(hf_cfg).eval().save_pretrained(tmp_path / "base")
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])

    hf = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
        peft.AdaLoraConfig(
            target_modules=["c_attn", "c_fc"], init_r=4, target_r=2, total_step=20, lora_alpha=8,
            fan_in_fan_out=True,
        ),
    )  # fmt: skip
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    keep = {
        f"base_model.model.transformer.h.{i}.{m}.lora_E.default": [bool(v) for v in k]
        for i in range(2)
        for m, k in (("attn.c_attn", [1, 0, 1, 1]), ("mlp.c_fc", [0, 1, 0, 1]))
    }
    hf.peft_config["default"].rank_pattern = {
        k.removeprefix("base_model.model."): v for k, v in keep.items()
    }
    for n, p in hf.named_parameters():  # the masked triplets are zero, as after allocation
        if n in keep:
            with torch.no_grad():
                p[~torch.tensor(keep[n])] = 0.0
    hf.eval()
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    hf.save_pretrained(tmp_path / "hf_adapter")

    with minipeft.dtype_policy("float32"):
        ours = PeftModel.from_pretrained(
            GPT2.from_pretrained(tmp_path / "base"), str(tmp_path / "hf_adapter")
        )
    ours.eval()
    with no_grad():
        got = ours(ids).data
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ranks = {n: m.r for n, m in ours.adapter_layers()}
    assert ranks["transformer.h.0.attn.c_attn"] == 3 and ranks["transformer.h.1.mlp.c_fc"] == 2

    # and back: minipeft writes, HF PEFT reads
    model = get_peft_model(
        GPT2.from_pretrained(tmp_path / "base"),
        AdaLoraConfig(target_modules=["c_attn", "c_fc"], init_r=4, target_r=2, total_step=20),
    )
    rng = np.random.default_rng(0)
    for _, layer in model.adapter_layers():
        for kind in ("lora_A", "lora_E", "lora_B"):
            p = layer.param(kind)
            p.data[...] = rng.standard_normal(p.shape) * 0.3
    kept = {"attn.c_attn": [True, True, False, True], "mlp.c_fc": [False, True, True, False]}
    model.peft_config["default"].rank_pattern = {
        f"transformer.h.{i}.{m}.lora_E": k for i in range(2) for m, k in kept.items()
    }
    # a matrix may lose every triplet (PEFT allows rank 0)
    model.peft_config["default"].rank_pattern["transformer.h.1.mlp.c_fc.lora_E"] = [False] * 4
    model.rankallocator.mask_using_rank_pattern(
        {k.removesuffix(".lora_E"): v for k, v in model.peft_config["default"].rank_pattern.items()}
    )
    model.eval()
    with no_grad():
        ours_logits = model(ids).data
    model.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    back = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), tmp_path / "ours"
    ).eval()
    with torch.no_grad():
        theirs = back(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours_logits, theirs, rtol=1e-4, atol=1e-5)
    # and minipeft reads its own file back, the rank-0 matrix included
    again = PeftModel.from_pretrained(
        GPT2.from_pretrained(tmp_path / "base"), str(tmp_path / "ours")
    )
    again.eval()
    with no_grad():
        np.testing.assert_allclose(again(ids).data, ours_logits, rtol=1e-6, atol=1e-7)
    assert {n: m.r for n, m in again.adapter_layers()}["transformer.h.1.mlp.c_fc"] == 0


def test_adalora_through_get_peft_model_trains_and_allocates():
    from minipeft.autograd import cross_entropy
    from minipeft.models.gpt2 import GPT2, GPT2Config
    from minipeft.optim import AdamW
    from minipeft.peft.inject import get_peft_model

    minipeft.seed(0)
    base = GPT2(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=16))
    cfg = AdaLoraConfig(target_modules=["c_attn", "c_fc"], init_r=4, target_r=2, tinit=2,
                        tfinal=3, deltaT=1, total_step=12)  # fmt: skip
    model = get_peft_model(base, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = np.random.default_rng(0).integers(0, 30, (4, 8))
    for step in range(cfg.total_step):
        logits = model(ids[:, :-1])
        loss = cross_entropy(logits, ids[:, 1:]) + model.orthogonal_regularization()
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    pattern = cfg.rank_pattern
    assert sum(sum(k) for k in pattern.values()) == 2 * len(pattern) == 8
    for name, layer in model.adapter_layers():
        assert layer.effective_rank() <= sum(pattern[f"{name}.lora_E"])
    # the base model's weights are untouched
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_merge_unmerge_and_disable_follow_hf_peft():
    minipeft.seed(1)
    with minipeft.dtype_policy("float64"):
        layer = SVDLinear(Linear(5, 3), r=4, lora_alpha=8)
    layer.E.data[:, 0] = [0.5, -1.0, 0.0, 2.0]
    x = Tensor(np.random.default_rng(2).standard_normal((2, 5)))
    w0 = layer.base_layer.weight.data.copy()
    y = layer(x).data
    layer.merge()
    np.testing.assert_allclose(layer(x).data, y, rtol=1e-12)  # merged: the same function
    with layer.disable_adapters():  # off: the base alone, unmerged first (as HF PEFT)
        np.testing.assert_allclose(layer(x).data, x.data @ w0.T + layer.base_layer.bias.data)
    assert not layer.merged
    np.testing.assert_allclose(layer.base_layer.weight.data, w0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(layer(x).data, y, rtol=1e-12)
