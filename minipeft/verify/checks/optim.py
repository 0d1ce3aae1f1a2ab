"""Checks for derivations/optim.md: AdamW, SGD momentum and the schedules, against closed forms.

Each check runs the real optimizer (or scheduler) for a few steps on an input whose
trajectory has a closed form derived in the markdown, and compares with that closed
form — never with a second run of the same code.
"""

from __future__ import annotations

import math

import numpy as np

from ...nn.module import Parameter
from ...optim import SGD, AdamW
from ...optim.adamw import adamw_update
from ...optim.schedules import (
    cosine_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    linear_with_warmup,
)
from ...optim.sgd import sgd_update
from ..registry import Outcome, equation


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)))


@equation(
    "optim.adamw_bias_correction",
    what="constant g: m̂ₜ = g, v̂ₜ = g², so θₜ = θ₀ − t·η·g/(|g| + ε)",
    derivation="optim.md",
    implements=adamw_update,
    tol=1e-12,
)
def _check_bias_correction() -> Outcome:
    g = np.array([[0.5, -2.0, 1e-3], [3.0, -0.25, 7.0]])  # (2, 3), one entry near ε-scale
    theta0 = np.array([[0.1, -0.2, 0.3], [1.0, 0.0, -1.0]])
    lr, eps, steps = 0.01, 1e-3, 25
    p = Parameter(theta0.copy())
    opt = AdamW([p], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
    for _ in range(steps):
        p.grad = g.copy()
        opt.step()
    # θₜ = θ₀ − t·η·g/(|g| + ε)
    expected = theta0 - steps * lr * g / (np.abs(g) + eps)
    return Outcome(
        error=_rel(p.data, expected),
        arrays={
            "theta0": theta0,
            "grad": g,
            "lr": np.array(lr),
            "eps": np.array(eps),
            "steps": np.array(steps),
            "theta_t": p.data.copy(),
        },
    )


@equation(
    "optim.adamw_decoupled_decay",
    what="decoupled decay: g = 0 gives θₜ = θ₀·(1 − ηλ)ᵗ; constant g an affine closed form",
    derivation="optim.md",
    implements=adamw_update,
    tol=1e-12,
)
def _check_decoupled_decay() -> Outcome:
    lr, wd, eps, steps = 0.05, 0.2, 1e-8, 30
    theta0 = np.array([1.5, -0.5, 2.0, 0.25])
    p = Parameter(theta0.copy())
    opt = AdamW([p], lr=lr, weight_decay=wd, eps=eps)
    for _ in range(steps):
        p.grad = np.zeros_like(theta0)
        opt.step()
    # θₜ = θ₀·(1 − ηλ)ᵗ
    zero_grad = theta0 * (1 - lr * wd) ** steps
    err = _rel(p.data, zero_grad)
    # constant g: θₜ = aᵗθ₀ − η·u·(1 − aᵗ)/(1 − a), a = 1 − ηλ, u = g/(|g| + ε)
    g = np.array([0.3, -1.0, 0.0, 2.0])
    q = Parameter(theta0.copy())
    opt = AdamW([q], lr=lr, weight_decay=wd, eps=eps)
    for _ in range(steps):
        q.grad = g.copy()
        opt.step()
    a = 1 - lr * wd
    u = g / (np.abs(g) + eps)
    affine = a**steps * theta0 - lr * u * (1 - a**steps) / (1 - a)
    err = max(err, _rel(q.data, affine))
    return Outcome(
        error=err,
        arrays={
            "theta0": theta0,
            "lr": np.array(lr),
            "weight_decay": np.array(wd),
            "steps": np.array(steps),
            "theta_t_zero_grad": p.data.copy(),
            "grad": g,
            "theta_t_const_grad": q.data.copy(),
        },
    )


@equation(
    "optim.sgd_momentum",
    what="constant g: bₜ = g(1 − μᵗ)/(1 − μ); θₜ = θ₀ − ηgΣₛ(1 − μ^(s+k))/(1 − μ)",
    derivation="optim.md",
    implements=sgd_update,
    tol=1e-12,
)
def _check_sgd_momentum() -> Outcome:
    lr, mu, steps = 0.1, 0.9, 20
    g = np.array([0.7, -0.2, 1.5])
    theta0 = np.array([2.0, -1.0, 0.5])
    arrays = {"theta0": theta0, "grad": g, "lr": np.array(lr), "momentum": np.array(mu)}
    err = 0.0
    for nesterov in (False, True):
        p = Parameter(theta0.copy())
        opt = SGD([p], lr=lr, momentum=mu, nesterov=nesterov)
        for _ in range(steps):
            p.grad = g.copy()
            opt.step()
        k = 1 if nesterov else 0  # Nesterov looks one momentum step ahead
        # θₜ = θ₀ − η·g·Σₛ (1 − μ^(s+k))/(1 − μ)
        total = sum((1 - mu ** (s + k)) / (1 - mu) for s in range(1, steps + 1))
        err = max(err, _rel(p.data, theta0 - lr * g * total))
        arrays["theta_t_nesterov" if nesterov else "theta_t_heavy_ball"] = p.data.copy()
    return Outcome(error=err, arrays=arrays)


def _run_schedule(make, steps: int) -> np.ndarray:
    p = Parameter(np.zeros(1))
    opt = SGD([p], lr=1.0)
    sched = make(opt)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return np.array(lrs)


@equation(
    "optim.cosine_schedule",
    what="warmup k/W, then ½(1 + cos(π(k − W)/(T − W))): exact values at k = W + (T − W)·p",
    derivation="optim.md",
    implements=cosine_with_warmup,
    tol=1e-14,
)
def _check_cosine() -> Outcome:
    lrs = _run_schedule(lambda o: get_cosine_schedule_with_warmup(o, 4, 16), 16)
    r2 = math.sqrt(2)
    # k: 0..4 warmup k/4; then p = (k − 4)/12 ∈ {0, ¼, ⅓, ½, ⅔, ¾, 1}
    exact = {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 7: (2 + r2) / 4, 8: 0.75, 10: 0.5,
             12: 0.25, 13: (2 - r2) / 4, 16: 0.0}  # fmt: skip
    ks = np.array(sorted(exact))
    ref = np.array([exact[k] for k in ks])
    return Outcome(
        error=float(np.max(np.abs(lrs[ks] - ref))),
        arrays={"k": ks, "expected": ref, "lr": lrs[ks]},
    )


@equation(
    "optim.linear_schedule",
    what="warmup k/W, then (T − k)/(T − W), clipped at 0",
    derivation="optim.md",
    implements=linear_with_warmup,
    tol=1e-14,
)
def _check_linear() -> Outcome:
    lrs = _run_schedule(lambda o: get_linear_schedule_with_warmup(o, 2, 10), 11)
    ref = np.array([0, 4, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]) / 8.0
    return Outcome(
        error=float(np.max(np.abs(lrs - ref))),
        arrays={"k": np.arange(12), "expected": ref, "lr": lrs},
    )
