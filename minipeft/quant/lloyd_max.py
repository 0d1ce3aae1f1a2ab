"""Minimum-MSE scalar quantization (Lloyd, 1957/1982; Max, 1960) and the limits around it.

A scalar quantizer with n levels y_0 < … < y_{n-1} and decision thresholds
t_1 < … < t_{n-1} (t_0 = −∞, t_n = +∞) maps x ∈ [t_i, t_{i+1}) to y_i. Its distortion is

    D = E[(X − Q(X))²] = Σ_i ∫_{t_i}^{t_{i+1}} (x − y_i)² p(x) dx.

Setting ∂D/∂y_i = 0 and ∂D/∂t_i = 0 gives the two necessary conditions of Lloyd and Max:

    y_i = E[X | t_i ≤ X < t_{i+1}]          (centroid condition)
    t_i = (y_{i−1} + y_i) / 2                (midpoint / nearest-neighbour condition)

For X ~ N(0, 1) every integral is closed form (φ the density, Φ the CDF):

    ∫_a^b φ = Φ(b) − Φ(a),   ∫_a^b x φ = φ(a) − φ(b),   ∫_a^b x² φ = Φ(b) − Φ(a) + aφ(a) − bφ(b),

so the centroid is E[X | a < X < b] = (φ(a) − φ(b)) / (Φ(b) − Φ(a)), and D is exact.
Derivation: ``derivations/quantization.md``. The quantile (equal-probability) quantizer that
NF4 imitates maximizes the entropy of the code, not its MSE — see ``code_entropy``.

References: S. P. Lloyd, "Least squares quantization in PCM", IEEE Trans. IT-28 (1982)
(Bell Labs memo 1957); J. Max, "Quantizing for minimum distortion", IRE Trans. IT-6 (1960)
7-12; P. F. Panter & W. Dite, Proc. IRE 39 (1951) 44-48; T. Cover & J. Thomas, Elements of
Information Theory, ch. 10 (Gaussian rate-distortion function).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
from scipy import optimize, special

__all__ = [
    "LloydMax",
    "UniformQuantizer",
    "code_entropy",
    "gaussian_bin_probabilities",
    "gaussian_quantizer_mse",
    "lloyd_max_gaussian",
    "lloyd_max_samples",
    "lloyd_max_step",
    "midpoint_thresholds",
    "optimal_uniform_gaussian",
    "panter_dite_gaussian",
    "quantize_to_levels",
    "rate_distortion_gaussian",
    "truncated_gaussian_mean",
]

_SQRT2PI = math.sqrt(2.0 * math.pi)


class LloydMax(NamedTuple):
    """A scalar quantizer: increasing levels (n,), interior thresholds (n−1,), its MSE."""

    levels: np.ndarray
    thresholds: np.ndarray
    mse: float


class UniformQuantizer(NamedTuple):
    """A symmetric uniform quantizer: step Δ, levels (i − (n−1)/2)·Δ, thresholds, MSE."""

    step: float
    levels: np.ndarray
    thresholds: np.ndarray
    mse: float


# ----------------------------------------------------------------------------- validation
def _check_n_levels(n_levels: object) -> int:
    if isinstance(n_levels, bool) or not isinstance(n_levels, int | np.integer):
        raise TypeError(f"n_levels: expected an int, got {type(n_levels).__name__}")
    if n_levels < 2:
        raise ValueError(f"n_levels: expected an integer ≥ 2, got {n_levels}")
    return int(n_levels)


def _as_sorted_levels(levels: object, name: str = "levels") -> np.ndarray:
    y = np.asarray(levels, dtype=np.float64)
    if y.ndim != 1 or y.size < 2:
        raise ValueError(f"{name}: expected a 1-D array of ≥ 2 values, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name}: expected finite values, got {y}")
    if np.any(np.diff(y) <= 0):
        raise ValueError(f"{name}: expected strictly increasing values, got {y}")
    return y


# ----------------------------------------------------------------------- Gaussian integrals
def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal density; φ(±∞) = 0."""
    return np.exp(-0.5 * np.square(x)) / _SQRT2PI


def _xphi(x: np.ndarray) -> np.ndarray:
    """x·φ(x) with the limit 0 at ±∞ (avoids ∞·0)."""
    finite = np.isfinite(x)
    return np.where(finite, np.where(finite, x, 0.0) * _phi(np.where(finite, x, 0.0)), 0.0)


def _mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(a < X < b) = Φ(b) − Φ(a), computed from the tail it lies in (no cancellation)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    upper = special.ndtr(-a) - special.ndtr(-b)  # Φ(−a) − Φ(−b): accurate for a > 0
    lower = special.ndtr(b) - special.ndtr(a)
    return np.where(a > 0, upper, lower)


def gaussian_bin_probabilities(thresholds: np.ndarray) -> np.ndarray:
    """P(t_i ≤ X < t_{i+1}) for X ~ N(0,1), with t_0 = −∞ and t_n = +∞; shape (n,).

    [quant.code_entropy] provides the p_i of H = −Σ p_i log₂ p_i.
    """
    t = np.asarray(thresholds, np.float64)
    if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0):
        raise ValueError(f"thresholds: expected a finite non-decreasing 1-D array, got {t}")
    edges = np.concatenate([[-np.inf], t, [np.inf]])
    # p_i = Φ(t_{i+1}) − Φ(t_i)
    return _mass(edges[:-1], edges[1:])


def truncated_gaussian_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """E[X | a < X < b] for X ~ N(0,1), elementwise; a may be −∞ and b +∞.

    [quant.truncated_gaussian_mean]  E[X | a<X<b] = (φ(a) − φ(b)) / (Φ(b) − Φ(a)).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if np.any(np.isnan(a)) or np.any(np.isnan(b)):
        raise ValueError("a, b: expected numbers or ±inf, got NaN")
    if np.any(b <= a):
        raise ValueError(f"a, b: expected a < b elementwise, got a={a}, b={b}")
    # (φ(a) − φ(b)) / (Φ(b) − Φ(a))
    return (_phi(a) - _phi(b)) / _mass(a, b)


def midpoint_thresholds(levels: np.ndarray) -> np.ndarray:
    """Nearest-neighbour thresholds t_i = (y_{i−1} + y_i)/2 of increasing levels; (n−1,)."""
    y = _as_sorted_levels(levels)
    return 0.5 * (y[:-1] + y[1:])  # t_i = (y_{i−1} + y_i) / 2


def gaussian_quantizer_mse(levels: np.ndarray, thresholds: np.ndarray | None = None) -> float:
    """Exact E[(X − Q(X))²] for X ~ N(0,1) of the quantizer (levels, thresholds).

    [quant.gaussian_quantizer_mse]  D = Σ_i [ (1 + y_i²)P_i + t_iφ(t_i) − t_{i+1}φ(t_{i+1})
    − 2 y_i (φ(t_i) − φ(t_{i+1})) ], with P_i = Φ(t_{i+1}) − Φ(t_i).
    ``thresholds`` defaults to the midpoints (nearest-level rounding).
    """
    y = _as_sorted_levels(levels)
    t = midpoint_thresholds(y) if thresholds is None else np.asarray(thresholds, np.float64)
    if t.shape != (y.size - 1,):
        raise ValueError(f"thresholds: expected shape ({y.size - 1},), got {t.shape}")
    if np.any(np.diff(t) < 0) or not np.all(np.isfinite(t)):
        raise ValueError(f"thresholds: expected finite non-decreasing values, got {t}")
    a = np.concatenate([[-np.inf], t])  # lower edges (n,)
    b = np.concatenate([t, [np.inf]])  # upper edges (n,)
    P = _mass(a, b)  # ∫ φ
    M1 = _phi(a) - _phi(b)  # ∫ x φ
    M2 = P + _xphi(a) - _xphi(b)  # ∫ x² φ
    # ∫ (x − y)² φ = M2 − 2 y M1 + y² P
    return float(np.sum(M2 - 2.0 * y * M1 + y * y * P))


def code_entropy(probabilities: np.ndarray) -> float:
    """Entropy in bits of a code whose symbols have the given probabilities.

    [quant.code_entropy]  H = −Σ_i p_i log₂ p_i (terms with p_i = 0 contribute 0).
    Maximal, log₂ n, exactly for equal-probability bins — the quantile quantizer.
    """
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probabilities: expected a non-empty 1-D array, got shape {p.shape}")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("probabilities: expected finite non-negative values")
    if abs(p.sum() - 1.0) > 1e-9:
        raise ValueError(f"probabilities: expected a sum of 1, got {p.sum()!r}")
    nz = p[p > 0]
    return float(-np.sum(nz * np.log2(nz)))  # H = −Σ p log₂ p


# --------------------------------------------------------------------------- Lloyd-Max N(0,1)
def lloyd_max_step(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd iteration for N(0,1): midpoint thresholds, then centroid levels.

    [quant.lloyd_max_conditions]  t_i = (y_{i−1} + y_i)/2;  y_i ← E[X | t_i ≤ X < t_{i+1}].
    A quantizer satisfies both optimality conditions iff it is a fixed point of this map.
    Returns (new_levels (n,), thresholds (n−1,)).
    """
    t = midpoint_thresholds(levels)  # t_i = (y_{i−1} + y_i) / 2
    edges = np.concatenate([[-np.inf], t, [np.inf]])
    return truncated_gaussian_mean(edges[:-1], edges[1:]), t  # y_i = E[X | bin i]


def _newton_step(y: np.ndarray) -> np.ndarray:
    """Newton step for F(y) = y − C(y) = 0, C the Lloyd map; Jacobian in closed form.

    With m(a, b) = (φ(a) − φ(b))/P:  ∂m/∂a = φ(a)(m − a)/P,  ∂m/∂b = φ(b)(b − m)/P,
    and each interior threshold moves by ½ with each of its two neighbouring levels.
    """
    n = y.size
    t = 0.5 * (y[:-1] + y[1:])
    a = np.concatenate([[-np.inf], t])
    b = np.concatenate([t, [np.inf]])
    P = _mass(a, b)
    m = (_phi(a) - _phi(b)) / P
    dm_da = np.where(np.isfinite(a), _phi(a) * (m - np.where(np.isfinite(a), a, 0.0)) / P, 0.0)
    dm_db = np.where(np.isfinite(b), _phi(b) * (np.where(np.isfinite(b), b, 0.0) - m) / P, 0.0)
    J = np.eye(n)  # ∂F/∂y = I − ∂C/∂y (tridiagonal)
    i = np.arange(n)
    J[i[1:], i[1:] - 1] -= 0.5 * dm_da[1:]  # a_i = (y_{i−1} + y_i)/2
    J[i, i] -= 0.5 * dm_da + 0.5 * dm_db
    J[i[:-1], i[:-1] + 1] -= 0.5 * dm_db[:-1]  # b_i = (y_i + y_{i+1})/2
    return np.linalg.solve(J, -(y - m))


def lloyd_max_gaussian(n_levels: int, *, tol: float = 1e-12, max_iter: int = 10_000) -> LloydMax:
    """The minimum-MSE n-level scalar quantizer of N(0, 1) (Max, 1960), to ``tol``.

    [quant.lloyd_max_gaussian]  Solves y = C(y), C the Lloyd map (midpoint thresholds, then
    exact truncated-Gaussian centroids) by Newton's method with the closed-form tridiagonal
    Jacobian and backtracking, from the centroids of the equal-probability bins, until the
    fixed-point residual max|y − C(y)| is < ``tol``. (Plain Lloyd iteration converges to the
    same point, but linearly and slowly for many levels.)
    Returns LloydMax(levels (n,), thresholds (n−1,), mse) with the exact MSE.
    For σ ≠ 1 scale levels and thresholds by σ and the MSE by σ².
    """
    n = _check_n_levels(n_levels)
    if not (isinstance(tol, float | int) and tol >= 1e-14):
        raise ValueError(f"tol: expected a number ≥ 1e-14 (the float64 floor), got {tol!r}")
    # start: centroids of the equal-probability (quantile) bins
    edges = special.ndtri(np.arange(n + 1) / n)  # Φ⁻¹(k/n), ±∞ at the ends
    y = truncated_gaussian_mean(edges[:-1], edges[1:])

    def residual(v: np.ndarray) -> float:
        return float(np.max(np.abs(v - lloyd_max_step(v)[0])))  # ‖y − C(y)‖∞

    r = residual(y)
    for _ in range(max_iter):
        if r < tol:
            break
        dy = _newton_step(y)
        lam = 1.0
        while True:  # backtracking keeps the levels ordered and the residual falling
            cand = y + lam * dy
            if np.all(np.diff(cand) > 0):
                r_cand = residual(cand)
                if r_cand < r or lam < 1e-6:
                    break
            lam *= 0.5
            if lam < 1e-6:  # Newton stalls: fall back to one plain Lloyd step
                cand = lloyd_max_step(y)[0]
                r_cand = residual(cand)
                break
        y, r = cand, r_cand
    else:  # pragma: no cover
        raise RuntimeError(f"lloyd_max_gaussian: residual {r:.3g} > tol={tol} after {max_iter}")
    y = 0.5 * (y - y[::-1])  # exact odd symmetry y_{n−1−i} = −y_i (removes rounding drift)
    t = midpoint_thresholds(y)
    return LloydMax(y, t, gaussian_quantizer_mse(y, t))


def optimal_uniform_gaussian(n_levels: int) -> UniformQuantizer:
    """The minimum-MSE uniform (equal-step, symmetric, midpoint) quantizer of N(0,1).

    [quant.optimal_uniform]  Levels y_i = (i − (n−1)/2)·Δ; the step Δ minimizes the exact
    MSE D(Δ) (bounded Brent search, then Newton on dD/dΔ = 0 with central differences).
    """
    n = _check_n_levels(n_levels)
    k = np.arange(n) - (n - 1) / 2.0

    def mse(step: float) -> float:
        return gaussian_quantizer_mse(k * step)

    res = optimize.minimize_scalar(
        mse, bounds=(1e-3, 8.0 / n + 1.0), method="bounded", options={"xatol": 1e-10}
    )
    step = float(res.x)
    h = 1e-4
    for _ in range(5):  # polish: Newton on D'(Δ) = 0
        d1 = (mse(step + h) - mse(step - h)) / (2 * h)
        d2 = (mse(step + h) - 2 * mse(step) + mse(step - h)) / (h * h)
        if d2 <= 0:
            break
        step -= d1 / d2
    y = k * step
    return UniformQuantizer(step, y, midpoint_thresholds(y), gaussian_quantizer_mse(y))


# --------------------------------------------------------------------------------- limits
def rate_distortion_gaussian(rate_bits: float | np.ndarray, variance: float = 1.0) -> np.ndarray:
    """Shannon's distortion-rate function of a Gaussian source, D(R) = σ²·2^(−2R).

    [quant.rate_distortion]  The least MSE any code (of any block length) with R bits per
    sample can reach; equivalently R(D) = ½ log₂(σ²/D) for 0 < D ≤ σ².
    """
    R = np.asarray(rate_bits, np.float64)
    if np.any(R < 0) or not np.all(np.isfinite(R)):
        raise ValueError(f"rate_bits: expected finite values ≥ 0, got {rate_bits!r}")
    if not variance > 0:
        raise ValueError(f"variance: expected > 0, got {variance!r}")
    return variance * np.exp2(-2.0 * R)  # D(R) = σ² 2^(−2R)


def panter_dite_gaussian(rate_bits: float | np.ndarray, variance: float = 1.0) -> np.ndarray:
    """High-rate approximation of the Lloyd-Max MSE for a Gaussian, (√3·π/2)·σ²·2^(−2R).

    [quant.panter_dite]  D ≈ (1/12)(∫ p^{1/3})³ N^{−2} = (√3 π / 2) σ² 2^{−2R}, N = 2^R
    (Panter & Dite, 1951); N²·D_LloydMax(N) → √3π/2 ≈ 2.7207 as N → ∞.
    """
    R = np.asarray(rate_bits, np.float64)
    if np.any(R < 0) or not np.all(np.isfinite(R)):
        raise ValueError(f"rate_bits: expected finite values ≥ 0, got {rate_bits!r}")
    return (math.sqrt(3.0) * math.pi / 2.0) * variance * np.exp2(-2.0 * R)


# ---------------------------------------------------------------------- sample Lloyd-Max
def quantize_to_levels(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Round each x to its nearest level (ties to the upper level); returns the indices."""
    y = _as_sorted_levels(levels)
    t = midpoint_thresholds(y)
    return np.searchsorted(t, np.asarray(x), side="right")  # index i with t_i ≤ x < t_{i+1}


def lloyd_max_samples(
    x: np.ndarray,
    n_levels: int,
    *,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> LloydMax:
    """Lloyd-Max for an empirical distribution: 1-D k-means on the samples ``x``.

    The same two conditions with the data's own measure: thresholds at midpoints, each level
    the mean of its samples. The data are sorted once; each iteration then finds the bin
    edges with a binary search and sums each bin's contiguous run (``np.add.reduceat``).
    Starts from the means of equal-count bins; stops when no level moves by more than
    tol·std(x). Returns LloydMax(levels, thresholds, mse) with the empirical MSE.
    """
    n = _check_n_levels(n_levels)
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"x: expected a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64).ravel()
    if a.size == 0:
        raise ValueError("x: expected at least one sample, got an empty array")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"x: expected finite values, got {int(np.sum(~np.isfinite(a)))} NaN/inf")
    s = np.sort(a)
    n_distinct = int(np.count_nonzero(np.diff(s)) + 1)
    if n_distinct < n:
        raise ValueError(f"x: expected at least n_levels={n} distinct values, got {n_distinct}")
    scale = float(np.std(s)) or 1.0
    # start: means of equal-count bins
    cuts = np.round(np.linspace(0, s.size, n + 1)).astype(np.int64)
    y = np.unique([s[lo:hi].mean() for lo, hi in itertools.pairwise(cuts) if hi > lo])
    if y.size < n:  # ties in the data: spread the start over the distinct values
        y = np.unique(s)[np.round(np.linspace(0, n_distinct - 1, n)).astype(np.int64)]
    for _ in range(max_iter):
        t = 0.5 * (y[:-1] + y[1:])  # t_i = (y_{i−1} + y_i) / 2
        idx = np.concatenate([[0], np.searchsorted(s, t, side="left"), [s.size]])
        count = idx[1:] - idx[:-1]
        full = count > 0
        sums = np.zeros(n)
        sums[full] = np.add.reduceat(s, idx[:-1][full])  # per-bin sums of the sorted data
        # y_i = mean of the samples in bin i (an empty bin keeps its level)
        y_new = np.sort(np.where(full, sums / np.maximum(count, 1), y))
        moved = np.max(np.abs(y_new - y))
        y = y_new
        if moved <= tol * scale:
            break
    if np.any(np.diff(y) <= 0):  # pragma: no cover - only for pathological data
        raise RuntimeError("lloyd_max_samples: two levels collapsed; try fewer n_levels")
    t = midpoint_thresholds(y)
    q = y[np.searchsorted(t, a, side="right")]  # same tie rule as the iteration
    return LloydMax(y, t, float(np.mean((a - q) ** 2)))
