"""Checks for derivations/dreambooth.md: the DDPM closed forms and the DreamBooth loss.

The forward-process marginal is compared with the one-step Markov chain composed step by
step; the posterior and the sampler step with Gaussian conditioning of the joint of
(x_{t−1}, xₜ) given x₀ (a different formula from the implemented one); the losses with a
plain-NumPy forward of a tiny denoiser written here; the gradients with float64 central
differences along random directions of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ... import backend
from ...autograd.tensor import Tensor, no_grad
from ...diffusion import Denoiser, DiffusionConfig, NoiseSchedule, diffusion_loss
from ...peft.config import LoraConfig
from ...peft.dreambooth import DEFAULT_TARGETS, dreambooth_loss
from ...peft.inject import get_peft_model
from ..registry import Outcome, equation

TINY = DiffusionConfig(
    num_classes=3, num_reserved=2, hidden=6, mlp_hidden=8, n_blocks=1, time_dim=4, T=12
)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)))


# ------------------------------------------------------------------------------ forward process
@equation(
    "diffusion.q_closed_form",
    what="q(xₜ|x₀) = N(√ᾱₜ·x₀, (1−ᾱₜ)I): the one-step chain composed t times",
    derivation="dreambooth.md",
    implements=NoiseSchedule.q_mean_var,
    tol=1e-12,
)
def _check_q_closed_form() -> Outcome:
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (1, 5))
    worst = 0.0
    means, vars_ = [], []
    for kind, T in (("cosine", 20), ("linear", 50)):
        sch = NoiseSchedule(T, kind)
        m, v = x0.copy(), 0.0  # x₋₁ = x₀ exactly
        for t in range(sch.T):
            # q(xₜ|xₜ₋₁) = N(√αₜ·xₜ₋₁, βₜ): mean √αₜ·m, variance αₜ·v + βₜ
            m, v = math.sqrt(sch.alphas[t]) * m, sch.alphas[t] * v + sch.betas[t]
            mean, var = sch.q_mean_var(x0, np.array([t]))
            worst = max(worst, _rel(mean, m), _rel(var, np.array([[v]])))
            if kind == "cosine":
                means.append(m[0])
                vars_.append(v)
    return Outcome(
        error=worst,
        arrays={"x0": x0[0], "mean_cosine_T20": np.array(means), "var_cosine_T20": np.array(vars_)},
    )


def _conditional(sch: NoiseSchedule, x0: np.ndarray, xt: np.ndarray, t: int) -> tuple:
    """q(x_{t−1}|xₜ, x₀) by conditioning the Gaussian joint of (x_{t−1}, xₜ) given x₀."""
    abp = sch.alpha_bar_prev[t]
    m1, v1 = math.sqrt(abp) * x0, 1.0 - abp  # x_{t−1} | x₀
    m2 = math.sqrt(sch.alphas[t]) * m1  # xₜ = √αₜ·x_{t−1} + √βₜ·n
    v2 = sch.alphas[t] * v1 + sch.betas[t]
    cov = math.sqrt(sch.alphas[t]) * v1  # Cov(x_{t−1}, xₜ)
    return m1 + cov / v2 * (xt - m2), v1 - cov * cov / v2


@equation(
    "diffusion.posterior",
    what="μ̃ₜ, β̃ₜ of q(x_{t−1}|xₜ,x₀) equal Gaussian conditioning of the joint",
    derivation="dreambooth.md",
    implements=NoiseSchedule.posterior_mean_var,
    tol=1e-12,
)
def _check_posterior() -> Outcome:
    rng = np.random.default_rng(1)
    sch = NoiseSchedule(15, "cosine")
    x0, xt = rng.uniform(-1, 1, (1, 4)), rng.standard_normal((1, 4))
    worst = 0.0
    mus = []
    for t in range(sch.T):
        ref_m, ref_v = _conditional(sch, x0, xt, t)
        mu, var = sch.posterior_mean_var(x0, xt, np.array([t]))
        # at t = 0 the variance is exactly 0: compare absolutely there
        err_v = abs(var[0, 0] - ref_v) if t == 0 else _rel(var, np.array([[ref_v]]))
        worst = max(worst, _rel(mu, ref_m), err_v)
        mus.append(mu[0])
    return Outcome(error=worst, arrays={"x0": x0[0], "xt": xt[0], "posterior_mean": np.array(mus)})


@equation(
    "diffusion.sampler_step",
    what="x_{t−1} = (xₜ − βₜ/√(1−ᾱₜ)·ε̂)/√αₜ + √β̃ₜ·z equals conditioning at x̂₀(ε̂)",
    derivation="dreambooth.md",
    implements=NoiseSchedule.sampler_step,
    tol=1e-10,
)
def _check_sampler_step() -> Outcome:
    rng = np.random.default_rng(2)
    sch = NoiseSchedule(50, "linear")
    xt, eps, z = rng.standard_normal((3, 2, 4))
    worst = 0.0
    outs = []
    for t in range(sch.T):
        # x̂₀ from the forward process: xₜ = √ᾱₜ·x₀ + √(1−ᾱₜ)·ε
        x0_hat = (xt - math.sqrt(1 - sch.alpha_bar[t]) * eps) / math.sqrt(sch.alpha_bar[t])
        ref_m, ref_v = _conditional(sch, x0_hat, xt, t)
        ref = ref_m + math.sqrt(max(ref_v, 0.0)) * z
        out = sch.sampler_step(xt, t, eps, z)
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
        outs.append(out)
    return Outcome(error=worst, arrays={"xt": xt, "eps_hat": eps, "z": z, "x_prev": np.array(outs)})


# ------------------------------------------------------------------------------ losses
def _tiny_model(seed: int, lora: bool) -> tuple[object, dict[str, object]]:
    """A float64 tiny denoiser (optionally with LoRA, A and B non-zero), random weights."""
    rng = np.random.default_rng(seed)
    with backend.dtype_policy("float64"):
        model = Denoiser(TINY)
        if lora:
            model = get_peft_model(
                model,
                LoraConfig(r=2, lora_alpha=3.0, target_modules=DEFAULT_TARGETS,
                           init_lora_weights=False),
            )  # fmt: skip
    params = dict(model.named_parameters())
    for p in params.values():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    return model, params


def _np_forward(params: dict[str, np.ndarray], xt: np.ndarray, t: np.ndarray, tok: np.ndarray,
                prefix: str = "", scale: float = 0.0) -> np.ndarray:  # fmt: skip
    """ε_θ(xₜ, t, c) in plain NumPy (LoRA layers: W₀ + s·B·A), for the exact checks."""

    def lin(name: str, x: np.ndarray) -> np.ndarray:
        key = prefix + name
        if key + ".base_layer.weight" in params:
            w = params[key + ".base_layer.weight"]
            w = (
                w
                + scale
                * params[key + ".lora_B.default.weight"]
                @ params[key + ".lora_A.default.weight"]
            )  # W₀ + s·B·A
            b = params[key + ".base_layer.bias"]
        else:
            w, b = params[key + ".weight"], params[key + ".bias"]
        return x @ w.T + b

    def gelu(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def ln(name: str, x: np.ndarray) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * params[prefix + name + ".weight"] + params[
            prefix + name + ".bias"
        ]

    half = TINY.time_dim // 2
    w = 10_000.0 ** (-np.arange(half) / half)
    temb = np.concatenate([np.cos(t[:, None] * w), np.sin(t[:, None] * w)], axis=1)
    c = gelu(
        lin("time_fc2", gelu(lin("time_fc1", temb))) + params[prefix + "token_emb.weight"][tok]
    )
    h = lin("in_proj", xt)
    for i in range(TINY.n_blocks):
        bp = f"blocks.{i}."
        h = h + lin(bp + "fc2", gelu(lin(bp + "fc1", ln(bp + "ln", h)) + lin(bp + "cond", c)))
    return lin("out_proj", ln("ln_f", h))


def _batch(rng: np.random.Generator, n: int, sch: NoiseSchedule) -> tuple:
    return rng.uniform(-1, 1, (n, 64)), rng.integers(0, sch.T, n), rng.standard_normal((n, 64))


def _directional(loss: Callable[[], Tensor], params: list, seed: int, n_dir: int = 3) -> float:
    """max over random directions v of |⟨∇L, v⟩ − (L(θ+εv) − L(θ−εv))/2ε| / scale."""
    for p in params:
        p.grad = None
    loss().backward()
    grads = [p.grad.copy() for p in params]
    rng = np.random.default_rng(seed)
    worst, h = 0.0, 1e-6
    for _ in range(n_dir):
        vs = [rng.standard_normal(p.shape) for p in params]
        analytic = sum(float((g * v).sum()) for g, v in zip(grads, vs))
        with no_grad():
            for p, v in zip(params, vs):
                p.data += h * v
            up = float(loss().item())
            for p, v in zip(params, vs):
                p.data -= 2 * h * v
            down = float(loss().item())
            for p, v in zip(params, vs):
                p.data += h * v
        numeric = (up - down) / (2 * h)  # central difference along v
        worst = max(worst, abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-12))
    return worst


@equation(
    "diffusion.simple_loss",
    what="L = mean‖ε − ε_θ(√ᾱₜx₀ + √(1−ᾱₜ)ε, t, c)‖²: value vs NumPy, ∇θ vs central differences",
    derivation="dreambooth.md",
    implements=diffusion_loss,
    tol=1e-6,
)
def _check_simple_loss() -> Outcome:
    model, params = _tiny_model(3, lora=False)
    sch = NoiseSchedule(TINY.T, "cosine")
    rng = np.random.default_rng(4)
    x0, t, eps = _batch(rng, 3, sch)
    tok = np.array([0, 2, 1])

    def loss() -> Tensor:
        return diffusion_loss(model, sch, x0, tok, t, eps)

    np_params = {k: p.data for k, p in params.items()}
    ab = sch.alpha_bar[t][:, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps  # the forward process, written out
    ref = np.mean((eps - _np_forward(np_params, xt, t, tok)) ** 2)
    value = float(loss().item())
    err_value = abs(value - ref) / abs(ref)
    err_grad = _directional(loss, list(params.values()), seed=5)
    return Outcome(
        error=max(err_value, err_grad),
        arrays={"x0": x0, "t": t, "eps": eps, "tokens": tok, "loss": np.array(value)},
    )


def _db_case(seed: int) -> tuple:
    model, params = _tiny_model(seed, lora=True)
    sch = NoiseSchedule(TINY.T, "cosine")
    rng = np.random.default_rng(seed + 1)
    inst, prior = _batch(rng, 2, sch), _batch(rng, 3, sch)
    return model, params, sch, inst, prior


@equation(
    "dreambooth.prior_loss",
    what="L = L_inst([V]) + λ·L_prior(c_class), each term vs a NumPy forward with W₀ + s·B·A",
    derivation="dreambooth.md",
    implements=dreambooth_loss,
    tol=1e-12,
)
def _check_prior_loss() -> Outcome:
    model, params, sch, (xi, ti, ei), (xp, tp, ep) = _db_case(6)
    ident, cls, lam = 3, 1, 0.7  # identifier: reserved row 3; class token 1
    out = dreambooth_loss(model, sch, xi, xp, identifier=ident, class_token=cls, lam=lam,
                          t_inst=ti, eps_inst=ei, t_prior=tp, eps_prior=ep)  # fmt: skip
    np_params = {k: p.data for k, p in params.items()}
    pre, s = "base_model.model.", 3.0 / 2  # s = α/r

    def mse(x0, t, eps, tok):
        ab = sch.alpha_bar[t][:, None]
        xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
        return np.mean((eps - _np_forward(np_params, xt, t, np.full(len(t), tok), pre, s)) ** 2)

    l_inst, l_prior = mse(xi, ti, ei, ident), mse(xp, tp, ep, cls)
    err = max(
        _rel(out.instance.data, l_inst),
        _rel(out.prior.data, l_prior),
        _rel(out.total.data, l_inst + lam * l_prior),
    )
    return Outcome(
        error=err,
        arrays={"lam": np.array(lam), "L_inst": np.array(l_inst), "L_prior": np.array(l_prior),
                "L_total": np.asarray(out.total.data)},
    )  # fmt: skip


@equation(
    "dreambooth.loss_grad",
    what="∇φL = ∇φL_inst + λ∇φL_prior on the LoRA factors only, vs central differences",
    derivation="dreambooth.md",
    implements=dreambooth_loss,
    tol=1e-6,
)
def _check_loss_grad() -> Outcome:
    model, params, sch, (xi, ti, ei), (xp, tp, ep) = _db_case(8)
    lora = [p for k, p in params.items() if ".lora_" in k]
    frozen = [p for k, p in params.items() if ".lora_" not in k]
    lam = 1.3

    def part(l_i: float, l_p: float) -> Callable[[], Tensor]:
        def f() -> Tensor:
            out = dreambooth_loss(model, sch, xi, xp, identifier=4, class_token=2, lam=lam,
                                  t_inst=ti, eps_inst=ei, t_prior=tp, eps_prior=ep)  # fmt: skip
            return out.instance * l_i + out.prior * l_p

        return f

    err = _directional(part(1.0, lam), lora, seed=9)  # the total L = L_inst + λ·L_prior
    g_total = [p.grad.copy() for p in lora]
    _directional(part(1.0, 0.0), lora, seed=9, n_dir=0)
    g_inst = [p.grad.copy() for p in lora]
    _directional(part(0.0, 1.0), lora, seed=9, n_dir=0)
    g_prior = [p.grad.copy() for p in lora]
    # ∇L = ∇L_inst + λ·∇L_prior (linearity, up to rounding)
    lin = max(
        float(np.abs(a - (b + lam * c)).max() / np.abs(a).max())
        for a, b, c in zip(g_total, g_inst, g_prior)
    )
    no_base_grad = all(p.grad is None for p in frozen)  # θ₀ frozen: no gradient buffer at all
    return Outcome(
        error=max(err, lin) if no_base_grad else float("inf"),
        arrays={"lam": np.array(lam), "grad_A_first": g_total[0], "grad_B_first": g_total[1]},
    )
