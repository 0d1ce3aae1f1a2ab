"""Checks for derivations/quantization.md: Lloyd-Max, the Gaussian integrals, the limits.

References used here, never the code under test:
- numerical quadrature (scipy.integrate.quad) of the defining integrals;
- the published tables of J. Max, "Quantizing for minimum distortion", IRE Trans. Inf.
  Theory IT-6 (1960) 7-12, Table I (optimum quantizer) and Table II (optimum uniform);
- scipy.stats.entropy (a peer implementation of Shannon entropy);
- the Blahut-Arimoto algorithm (Blahut 1972) run on a discretized Gaussian, an independent
  numerical solution of the rate-distortion problem.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import integrate, special, stats

from minipeft.quant.lloyd_max import (
    code_entropy,
    gaussian_bin_probabilities,
    gaussian_quantizer_mse,
    lloyd_max_gaussian,
    lloyd_max_step,
    optimal_uniform_gaussian,
    panter_dite_gaussian,
    rate_distortion_gaussian,
    truncated_gaussian_mean,
)
from minipeft.verify import Outcome, equation


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # scalar φ, fast under quad


# Max (1960), Table I: non-negative output levels y, thresholds x > 0 and the MSE, as
# printed (4 significant digits). The 16-level MSE is printed 0.009497; the converged
# optimum is 0.0095010 (a 4·10⁻⁴ relative discrepancy of the 1960 computation) — hence tol.
MAX_1960_TABLE_I = {
    2: {"y": [0.7980], "x": [], "mse": 0.3634},
    4: {"y": [0.4528, 1.510], "x": [0.9816], "mse": 0.1175},
    8: {"y": [0.2451, 0.7560, 1.344, 2.152], "x": [0.5006, 1.050, 1.748], "mse": 0.03454},
    16: {
        "y": [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733],
        "x": [0.2582, 0.5224, 0.7996, 1.099, 1.437, 1.844, 2.401],
        "mse": 0.009497,
    },
}
# Max (1960), Table II: optimum uniform quantizer, step and MSE.
MAX_1960_TABLE_II = {2: (1.596, 0.3634), 4: (0.9957, 0.1188), 8: (0.5860, 0.03744),
                     16: (0.3352, 0.01154)}  # fmt: skip


def _quad(f, a: float, b: float) -> float:
    val, _ = integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-13, limit=200)
    return val


@equation(
    "quant.truncated_gaussian_mean",
    what="E[X | a<X<b] = (φ(a) − φ(b)) / (Φ(b) − Φ(a)) for X ~ N(0,1)",
    derivation="quantization.md",
    implements=truncated_gaussian_mean,
    tol=1e-10,
)
def _check_truncated_mean() -> Outcome:
    a = np.array([-np.inf, -2.0, -0.3, 0.1, 1.5, 3.0])
    b = np.array([-1.0, 0.5, 0.2, 0.4, np.inf, np.inf])
    m = truncated_gaussian_mean(a, b)
    ref = np.array(
        [_quad(lambda x: x * _phi(x), lo, hi) / _quad(_phi, lo, hi) for lo, hi in zip(a, b)]
    )
    return Outcome(error=float(np.max(np.abs(m - ref))), arrays={"a": a, "b": b, "mean": m})


@equation(
    "quant.gaussian_quantizer_mse",
    what="exact D = Σ_i ∫_{t_i}^{t_{i+1}} (x − y_i)² φ(x) dx in closed form",
    derivation="quantization.md",
    implements=gaussian_quantizer_mse,
    tol=1e-10,
)
def _check_gaussian_mse() -> Outcome:
    y = np.array([-1.9, -0.7, -0.2, 0.4, 1.1, 2.6])  # deliberately not optimal
    t = np.array([-1.5, -0.5, 0.0, 0.9, 1.7])  # and thresholds that are not midpoints
    d = gaussian_quantizer_mse(y, t)
    edges = np.concatenate([[-np.inf], t, [np.inf]])
    ref = sum(
        _quad(lambda x, q=q: (x - q) ** 2 * _phi(x), lo, hi)
        for q, lo, hi in zip(y, edges[:-1], edges[1:])
    )
    return Outcome(error=abs(d - ref), arrays={"levels": y, "thresholds": t, "mse": np.array(d)})


@equation(
    "quant.lloyd_max_conditions",
    what="optimum satisfies y_i = E[X | t_i ≤ X < t_{i+1}] and t_i = (y_{i−1} + y_i)/2",
    derivation="quantization.md",
    implements=lloyd_max_step,
    tol=1e-10,
)
def _check_conditions() -> Outcome:
    errs = []
    arrays = {}
    for n in (3, 16):
        levels, thr, _ = lloyd_max_gaussian(n)
        edges = np.concatenate([[-np.inf], thr, [np.inf]])
        centroids = np.array(  # centroid condition, by quadrature
            [_quad(lambda x: x * _phi(x), lo, hi) / _quad(_phi, lo, hi)
             for lo, hi in itertools.pairwise(edges)]
        )  # fmt: skip
        errs.append(np.max(np.abs(levels - centroids)))
        errs.append(np.max(np.abs(thr - 0.5 * (levels[:-1] + levels[1:]))))  # midpoints
        arrays[f"levels_{n}"], arrays[f"thresholds_{n}"] = levels, thr
    # the Lloyd map itself, on levels that are not optimal, against quadrature
    y0 = np.array([-1.0, 0.1, 0.3, 2.0])
    y1, t1 = lloyd_max_step(y0)
    e1 = np.concatenate([[-np.inf], t1, [np.inf]])
    ref = [
        _quad(lambda x: x * _phi(x), lo, hi) / _quad(_phi, lo, hi)
        for lo, hi in itertools.pairwise(e1)
    ]
    errs.append(np.max(np.abs(y1 - np.array(ref))))
    return Outcome(error=float(max(errs)), arrays=arrays)


@equation(
    "quant.lloyd_max_gaussian",
    what="Lloyd-Max quantizer of N(0,1) reproduces Max (1960) Table I, N = 2, 4, 8, 16",
    derivation="quantization.md",
    implements=lloyd_max_gaussian,
    tol=5e-4,
)
def _check_max_table() -> Outcome:
    err = 0.0
    arrays = {}
    for n, row in MAX_1960_TABLE_I.items():
        levels, thr, mse = lloyd_max_gaussian(n)
        y_pos = levels[n // 2 :]
        x_pos = thr[n // 2 :]  # thresholds > 0 (t = 0 is the middle one for even n)
        # printed to 4 significant digits: compare relative to the printed value
        err = max(err, float(np.max(np.abs(y_pos - row["y"]) / np.array(row["y"]))))
        if row["x"]:
            err = max(err, float(np.max(np.abs(x_pos - row["x"]) / np.array(row["x"]))))
        err = max(err, abs(mse - row["mse"]) / row["mse"])
        arrays[f"levels_{n}"], arrays[f"mse_{n}"] = levels, np.array(mse)
    return Outcome(error=err, arrays=arrays)  # the largest: 16-level MSE 0.009497 vs 0.0095010


@equation(
    "quant.optimal_uniform",
    what="best uniform quantizer of N(0,1) reproduces Max (1960) Table II (step, MSE)",
    derivation="quantization.md",
    implements=optimal_uniform_gaussian,
    tol=5e-4,
)
def _check_uniform_table() -> Outcome:
    err = 0.0
    arrays = {}
    for n, (step, mse) in MAX_1960_TABLE_II.items():
        u = optimal_uniform_gaussian(n)
        err = max(err, abs(u.step - step) / step, abs(u.mse - mse) / mse)
        arrays[f"step_{n}"], arrays[f"mse_{n}"] = np.array(u.step), np.array(u.mse)
    return Outcome(error=err, arrays=arrays)


@equation(
    "quant.code_entropy",
    what="H = −Σ p_i log₂ p_i of the code; = log₂ N exactly for equal-probability bins",
    derivation="quantization.md",
    implements=code_entropy,
    tol=1e-12,
)
def _check_entropy() -> Outcome:
    n = 16
    quantile_thr = special.ndtri(np.arange(1, n) / n)  # equal-probability bins
    p_q = gaussian_bin_probabilities(quantile_thr)
    _, lm_thr, _ = lloyd_max_gaussian(n)
    p_lm = gaussian_bin_probabilities(lm_thr)
    e1 = abs(code_entropy(p_q) - math.log2(n))  # closed form: log₂ 16 = 4
    e2 = abs(code_entropy(p_lm) - float(stats.entropy(p_lm, base=2)))  # peer implementation
    return Outcome(error=max(e1, e2), arrays={"p_quantile": p_q, "p_lloyd_max": p_lm})


def _blahut_arimoto(beta: float, h: float = 0.1, span: float = 8.0, iters: int = 60):
    """(R bits, D) on the R(D) curve of a discretized N(0,1) at slope parameter β."""
    x = np.arange(-span, span + h / 2, h)
    p = np.exp(-0.5 * x * x)
    p /= p.sum()
    d = (x[:, None] - x[None, :]) ** 2
    A = np.exp(-beta * d)
    q = p.copy()
    for _ in range(iters):
        Q = A * q[None, :]
        Q /= Q.sum(axis=1, keepdims=True)  # Q(y|x) ∝ q(y) e^{−β d(x,y)}
        q = p @ Q  # q(y) = Σ_x p(x) Q(y|x)
    D = float(np.sum(p[:, None] * Q * d))
    ratio = np.where(Q > 0, Q / q[None, :], 1.0)
    R = float(np.sum(p[:, None] * Q * np.log2(ratio)))
    return R, D


@equation(
    "quant.rate_distortion",
    what="Gaussian distortion-rate function D(R) = σ²·2^(−2R)",
    derivation="quantization.md",
    implements=rate_distortion_gaussian,
    tol=1e-6,
)
def _check_rate_distortion() -> Outcome:
    rs, ds = [], []
    for D_target in (0.5, 0.25, 0.0625):
        R, D = _blahut_arimoto(beta=1.0 / (2.0 * D_target))  # Gaussian test channel slope
        rs.append(R)
        ds.append(D)
    rs, ds = np.array(rs), np.array(ds)
    err = float(np.max(np.abs(rate_distortion_gaussian(rs) - ds) / ds))
    return Outcome(error=err, arrays={"rate_bits": rs, "distortion": ds})


@equation(
    "quant.panter_dite",
    what="high-rate Lloyd-Max MSE ≈ (1/12)(∫p^{1/3})³ 2^{−2R} = (√3π/2) σ² 2^{−2R}",
    derivation="quantization.md",
    implements=panter_dite_gaussian,
    tol=1e-10,
)
def _check_panter_dite() -> Outcome:
    integral = _quad(lambda x: _phi(x) ** (1.0 / 3.0), -np.inf, np.inf)
    ref = integral**3 / 12.0  # (1/12)(∫ φ^{1/3})³, by quadrature
    val = float(panter_dite_gaussian(0.0))
    return Outcome(error=abs(val - ref) / ref, arrays={"constant": np.array(val)})
