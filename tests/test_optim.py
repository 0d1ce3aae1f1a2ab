"""Optimizers and schedules: closed forms, PyTorch / Hugging Face peers, save and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.nn import Linear, Parameter
from minipeft.optim import (
    SGD,
    AdamW,
    LambdaLR,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    load_state,
    save_state,
)

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _params(seed: int = 0, dtype=np.float64) -> list[Parameter]:
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def _grads(rng: np.random.Generator, dtype=np.float64) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


# ---------------------------------------------------------------------------- closed forms
@given(
    lr=st.floats(1e-4, 0.5),
    wd=st.floats(1e-3, 1.0),
    steps=st.integers(1, 40),
    opt_name=st.sampled_from(["adamw", "sgd"]),
)
def test_zero_gradient_decays_geometrically(lr, wd, steps, opt_name):
    """With g = 0 the only change is the decay: θ_t = θ₀·(1 − ηλ)ᵗ (AdamW: decoupled)."""
    (p,) = _params()[:1]
    theta0 = p.data.copy()
    if opt_name == "adamw":
        opt = AdamW([p], lr=lr, weight_decay=wd)
    else:
        opt = SGD([p], lr=lr, weight_decay=wd)
    for _ in range(steps):
        p.grad = np.zeros_like(p.data)
        opt.step()
    np.testing.assert_allclose(p.data, theta0 * (1 - lr * wd) ** steps, rtol=1e-12, atol=0)


def test_zero_gradient_decay_float32():
    p = Parameter(np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4))
    theta0 = p.data.astype(np.float64)
    opt = AdamW([p], lr=0.1, weight_decay=0.05)
    for _ in range(30):
        p.grad = np.zeros_like(p.data)
        opt.step()
    assert p.data.dtype == np.float32
    np.testing.assert_allclose(p.data, theta0 * (1 - 0.1 * 0.05) ** 30, rtol=2e-6)


@given(g=st.floats(-5, 5).filter(lambda x: abs(x) > 1e-3), steps=st.integers(1, 30))
def test_adamw_constant_gradient_moves_by_lr(g, steps):
    """Bias correction: with constant g, m̂ₜ = g and v̂ₜ = g², so each step is −η·g/(|g| + ε)."""
    lr, eps = 0.01, 1e-8
    p = Parameter(np.full((2, 2), 0.3))
    opt = AdamW([p], lr=lr, eps=eps, weight_decay=0.0)
    for _ in range(steps):
        p.grad = np.full((2, 2), g)
        opt.step()
    expected = 0.3 - steps * lr * g / (abs(g) + eps)
    np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


def test_lecture_update_differs_from_adamw():
    """ERRATA 9: without bias correction the first step is (1 − β₁)/√(1 − β₂) ≈ 3.16× too big,
    and −λθ (no η) decays 1/η times faster than decoupled decay."""
    lr, b1, b2, eps, wd, g = 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5
    p = Parameter(np.array([1.0]))
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p.grad = np.array([g])
    opt.step()
    ours = 1.0 - p.data[0]
    # the lecture's step 1: m = (1−β₁)g, v = (1−β₂)g², θ ← θ − η·m/(√v + ε) − λθ
    m, v = (1 - b1) * g, (1 - b2) * g * g
    lecture_move = lr * m / (math.sqrt(v) + eps)
    lecture_decay = wd * 1.0
    assert lecture_move / (ours - lr * wd) == pytest.approx((1 - b1) / math.sqrt(1 - b2), rel=1e-6)
    assert lecture_decay / (lr * wd) == pytest.approx(1 / lr)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_constant_gradient(nesterov):
    """bₜ = g·(1 − μᵗ)/(1 − μ); the step is η·bₜ (heavy ball) or η·g·(1 − μᵗ⁺¹)/(1 − μ)."""
    lr, mu, g, steps = 0.1, 0.9, 0.7, 25
    p = Parameter(np.array([2.0, -1.0]))
    opt = SGD([p], lr=lr, momentum=mu, nesterov=nesterov)
    for _ in range(steps):
        p.grad = np.full(2, g)
        opt.step()
    k = 1 if nesterov else 0
    total = sum((1 - mu ** (s + k)) / (1 - mu) for s in range(1, steps + 1))
    np.testing.assert_allclose(p.data, np.array([2.0, -1.0]) - lr * g * total, rtol=1e-12)


def test_cosine_schedule_closed_form_values():
    p = Parameter(np.zeros(1))
    opt = SGD([p], lr=2.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=16)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(18):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    r2, r3 = math.sqrt(2), math.sqrt(3)
    # past T the cosine rises again, as in Hugging Face's schedule (p = 14/12 at k = 18)
    expected = {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 7: (2 + r2) / 4, 8: 0.75, 10: 0.5,
                12: 0.25, 13: (2 - r2) / 4, 16: 0.0, 18: (1 - r3 / 2) / 2}  # fmt: skip
    for k, f in expected.items():
        assert lrs[k] == pytest.approx(2.0 * f, abs=1e-15), k


def test_linear_schedule_closed_form_values():
    p = Parameter(np.zeros(1))
    opt = SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(11):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0, 0])


# ---------------------------------------------------------------------------- peers
def _torch_groups(torch, params, specs):
    tps = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    return tps, [{"params": [tps[i] for i in idx], **hp} for idx, hp in specs]


ADAMW_SPECS = [
    ([0], {}),
    ([1], {"lr": 0.05, "weight_decay": 0.3, "betas": (0.8, 0.99)}),
    ([2], {"lr": 0.002, "weight_decay": 0.0, "eps": 1e-6}),
]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_adamw_matches_torch(dtype, rtol):
    torch = pytest.importorskip("torch", reason="torch is the reference for AdamW")
    params = _params(1, dtype)
    tps, tgroups = _torch_groups(torch, params, ADAMW_SPECS)
    ours = AdamW([{"params": [params[i] for i in idx], **hp} for idx, hp in ADAMW_SPECS],
                 lr=0.01, weight_decay=0.1)  # fmt: skip
    ref = torch.optim.AdamW(tgroups, lr=0.01, weight_decay=0.1)
    rng = np.random.default_rng(2)
    for t in range(80):
        for i, (p, tp, g) in enumerate(zip(params, tps, _grads(rng, dtype))):
            if i == 2 and t % 3 == 1:  # no gradient this step: skipped by both
                p.grad, tp.grad = None, None
            else:
                p.grad, tp.grad = g.copy(), torch.tensor(g)
        ours.step()
        ref.step()
    for p, tp in zip(params, tps):
        assert p.data.dtype == dtype
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=rtol, atol=rtol * 1e-2)
    for p, tp in zip(params, tps):
        st_ours, st_ref = ours.state[id(p)], ref.state[tp]
        assert st_ours["step"] == int(st_ref["step"])
        np.testing.assert_allclose(st_ours["exp_avg_sq"], st_ref["exp_avg_sq"].numpy(), rtol=rtol)


@pytest.mark.parametrize(
    "hp",
    [
        {"momentum": 0.0, "weight_decay": 0.0},
        {"momentum": 0.9, "weight_decay": 0.01},
        {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
    ],
)
def test_sgd_matches_torch(hp):
    torch = pytest.importorskip("torch", reason="torch is the reference for SGD")
    params = _params(3)
    specs = [([0, 1], {}), ([2], {"lr": 0.003})]
    tps, tgroups = _torch_groups(torch, params, specs)
    ours = SGD([{"params": [params[i] for i in idx], **h} for idx, h in specs], lr=0.02, **hp)
    ref = torch.optim.SGD(tgroups, lr=0.02, **hp)
    rng = np.random.default_rng(4)
    for t in range(60):
        for i, (p, tp, g) in enumerate(zip(params, tps, _grads(rng))):
            if i == 0 and t % 4 == 2:
                p.grad, tp.grad = None, None
            else:
                p.grad, tp.grad = g.copy(), torch.tensor(g)
        ours.step()
        ref.step()
    for p, tp in zip(params, tps):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["cosine", "cosine_cycles", "linear"])
def test_schedules_match_hugging_face(kind):
    torch = pytest.importorskip("torch", reason="the HF schedules run on torch optimizers")
    hf = pytest.importorskip("transformers.optimization", reason="HF defines the schedules")
    params = _params(5)
    specs = [([0], {"lr": 1e-3}), ([1, 2], {"lr": 1.6e-2})]  # two rates, as LoRA+ uses
    tps, tgroups = _torch_groups(torch, params, specs)
    ours = AdamW([{"params": [params[i] for i in idx], **h} for idx, h in specs])
    ref = torch.optim.AdamW(tgroups)
    w, n = 7, 40
    if kind == "linear":
        s_ours = get_linear_schedule_with_warmup(ours, w, n)
        s_ref = hf.get_linear_schedule_with_warmup(ref, w, n)
    else:
        c = 0.5 if kind == "cosine" else 1.5
        s_ours = get_cosine_schedule_with_warmup(ours, w, n, num_cycles=c)
        s_ref = hf.get_cosine_schedule_with_warmup(ref, w, n, num_cycles=c)
    rng = np.random.default_rng(6)
    for _ in range(n + 5):
        np.testing.assert_allclose(s_ours.get_last_lr(), s_ref.get_last_lr(), rtol=1e-15)
        for p, tp, g in zip(params, tps, _grads(rng)):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
    for p, tp in zip(params, tps):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- behaviour
def test_frozen_parameter_is_skipped():
    lin = Linear(3, 2)
    lin.weight.requires_grad_(False)
    w0, b0 = lin.weight.data.copy(), lin.bias.data.copy()
    opt = AdamW(lin.parameters(), lr=0.1, weight_decay=0.5)
    from minipeft.autograd import Tensor

    lin(Tensor(np.ones((4, 3), dtype=np.float32))).sum().backward()
    assert lin.weight.grad is None
    opt.step()
    np.testing.assert_array_equal(lin.weight.data, w0)  # no update, no decay
    assert id(lin.weight) not in opt.state
    assert not np.array_equal(lin.bias.data, b0)


def test_zero_grad():
    params = _params()
    opt = SGD(params, lr=0.1)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.zero_grad(set_to_none=False)
    assert all(np.all(p.grad == 0) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_save_and_resume_equals_uninterrupted(tmp_path, opt_name):
    def make(params):
        if opt_name == "adamw":
            opt = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.03}], lr=0.01)
        else:
            opt = SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.03}], lr=0.01,
                      momentum=0.9, nesterov=True)  # fmt: skip
        return opt, get_cosine_schedule_with_warmup(opt, 3, 20)

    def run(params, opt, sched, rng, steps):
        for _ in range(steps):
            for p, g in zip(params, _grads(rng, np.float32)):
                p.grad = g
            opt.step()
            sched.step()

    full = _params(7, np.float32)
    opt, sched = make(full)
    run(full, opt, sched, np.random.default_rng(8), 20)

    part = _params(7, np.float32)
    opt1, sched1 = make(part)
    rng = np.random.default_rng(8)
    run(part, opt1, sched1, rng, 9)
    path = save_state(tmp_path / "optim.safetensors", opt1, sched1)
    assert not list(tmp_path.glob("*.tmp"))
    # a fresh process: new parameter objects holding the saved weights
    resumed = [Parameter(p.data.copy()) for p in part]
    opt2, sched2 = make(resumed)
    load_state(path, opt2, sched2)
    assert opt2.param_groups[1]["lr"] == opt1.param_groups[1]["lr"]
    run(resumed, opt2, sched2, rng, 11)
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a.data, b.data)
        assert b.data.dtype == np.float32


def test_lambda_lr_per_group_multipliers():
    params = _params()
    opt = SGD([{"params": params[:1]}, {"params": params[1:], "lr": 4.0}], lr=1.0)
    sched = LambdaLR(opt, [lambda k: 1.0, lambda k: 0.5**k])
    sched.step()
    sched.step()
    assert sched.get_last_lr() == [1.0, 1.0]
    state = sched.state_dict()
    import json

    assert json.loads(json.dumps(state)) == state


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (-0.1, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_adamw_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(_params(), **kwargs)


def test_bad_groups_and_params():
    params = _params()
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(TypeError, match="Parameter"):
        AdamW([np.zeros(3)])
    with pytest.raises(ValueError, match="more than one"):
        AdamW([{"params": params[:2]}, {"params": params[1:]}])
    with pytest.raises(ValueError, match="unknown keys"):
        AdamW([{"params": params, "momentum": 0.9}])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.lr"):
        AdamW([{"params": params[:1]}, {"params": params[1:], "lr": -1.0}])
    with pytest.raises(TypeError, match="lr"):
        SGD(params, lr="0.1")
    with pytest.raises(ValueError, match="nesterov"):
        SGD(params, lr=0.1, nesterov=True)


def test_bad_gradients():
    (p,) = _params()[:1]
    opt = AdamW([p])
    p.grad = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"expected shape \(3, 4\)"):
        opt.step()
    p.grad = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        opt.step()


def test_load_state_rejects_mismatch(tmp_path):
    params = _params()
    opt = AdamW(params)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    path = save_state(tmp_path / "s.safetensors", opt)
    with pytest.raises(ValueError, match="param groups"):
        load_state(path, AdamW([{"params": params[:1]}, {"params": params[1:]}]))
    with pytest.raises(TypeError, match="AdamW"):
        load_state(path, SGD(params))
    other = [Parameter(np.zeros((2, 2))), *params[1:]]
    with pytest.raises(ValueError, match="expected shape"):
        load_state(path, AdamW(other))
    with pytest.raises(ValueError, match="schedule"):
        load_state(path, AdamW(params), get_linear_schedule_with_warmup(AdamW(params), 1, 5))
