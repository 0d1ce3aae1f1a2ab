"""Finite-difference gradient checks, always in float64 (derivations/autograd.md).

For a scalar function L(x₁, …, xₙ) built from minipeft ops, the analytic gradient
∇ₓL from ``backward`` is compared with central differences

    ∂L/∂x_k ≈ (L(x + ε e_k) − L(x − ε e_k)) / 2ε            (error O(ε²))

entry by entry for small inputs (the full gradient), and for large inputs along random
Gaussian directions v ~ N(0, I) (each entry moves by about ε, as in the full check):

    ⟨∇ₓL, v⟩ ≈ (L(x + ε v) − L(x − ε v)) / 2ε.

Why float64: the truncation error is O(ε²) and the rounding error O(u/ε) with unit
roundoff u; the best ε ≈ u^{1/3} gives error ≈ u^{2/3}: about 4·10⁻¹¹ in float64 but
about 2·10⁻⁵ in float32 — too coarse to tell a right gradient from a slightly wrong one.
Non-scalar outputs are reduced to a scalar with a fixed random cotangent ⟨f(x), w⟩, which
checks the whole vector-Jacobian product.

Inputs on the device (CuPy arrays) are checked on the device: the perturbations are made
on float64 host copies and every evaluation of f runs on device copies of them, so the
device's forward and backward are what is checked. A NaN anywhere (an analytic gradient
or a finite difference) makes the result NaN, which fails every ``error < tol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import backend
from .tensor import Tensor, no_grad

__all__ = ["GradcheckResult", "gradcheck", "numerical_grad", "rel_error"]


def rel_error(a: np.ndarray, b: np.ndarray, atol: float = 1e-12) -> float:
    """max |a − b| / max(|a|, |b|, atol) elementwise: 0 when equal, ~1 when unrelated."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), atol)
    return float(np.max(np.abs(a - b) / denom))


@dataclass(frozen=True)
class GradcheckResult:
    """Outcome of ``gradcheck``: the largest relative error over all inputs checked."""

    max_rel_error: float
    per_input: tuple[float, ...]
    mode: str  # "full" or "directional"

    def __float__(self) -> float:
        return self.max_rel_error


def _scalarize(out: Tensor, weights: np.ndarray | None) -> Tensor:
    if out.size == 1:
        return out.reshape(())
    return (out * Tensor(backend.like(weights, out.data))).sum()


def _contract(up: np.ndarray, down: np.ndarray, weights: np.ndarray | None) -> float:
    """⟨w, f(x + εv) − f(x − εv)⟩, differencing entry by entry *before* summing.

    Summing first would make every entry pay the rounding error of the whole sum,
    u·Σ|wᵢfᵢ|/ε: an output holding −10⁹ (a masked_fill value) would drown every other
    entry's difference. Entries that do not move cancel exactly here.
    """
    d = np.asarray(up, dtype=np.float64) - np.asarray(down, dtype=np.float64)
    return float(d.sum()) if weights is None else float(np.sum(weights * d))


def _value(
    f: Callable[..., Tensor], arrays: Sequence[np.ndarray], device: str = "numpy"
) -> np.ndarray:
    """f(*arrays) as a float64 host copy: f may return a view of an input (reshape,
    getitem) that the next perturbation would change under our feet. With ``device``
    "cupy", f runs on device copies of the (host) arrays."""
    ts = [Tensor(backend.to_device(a, device)) for a in arrays]
    return np.array(backend.to_numpy(f(*ts).data), dtype=np.float64)


def numerical_grad(
    f: Callable[..., Tensor],
    inputs: Sequence[np.ndarray],
    index: int,
    eps: float = 1e-6,
    weights: np.ndarray | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Central-difference gradient of the scalar f(*inputs) w.r.t. ``inputs[index]``.

    With ``weights`` w, f may return any shape and the gradient of ⟨w, f⟩ is returned.
    f runs on ``device`` (default: where the inputs live); the result is a host array.
    """
    device = _placement_of(inputs) if device is None else device
    # C order: x.reshape(-1) below must be a view, or the perturbation would be lost (a
    # Fortran-ordered or strided input would give a zero numerical gradient)
    xs = [np.array(backend.to_numpy(x), dtype=np.float64, copy=True, order="C") for x in inputs]
    x = xs[index]
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    with no_grad():
        for k in range(flat.size):
            old = flat[k]
            flat[k] = old + eps
            up = _value(f, xs, device)
            flat[k] = old - eps
            down = _value(f, xs, device)
            flat[k] = old
            # ∂L/∂x_k ≈ (L(x + ε e_k) − L(x − ε e_k)) / 2ε
            gflat[k] = _contract(up, down, weights) / (2 * eps)
    return grad


def gradcheck(
    f: Callable[..., Tensor],
    inputs: Sequence[np.ndarray],
    *,
    wrt: Sequence[int] | None = None,
    eps: float = 1e-6,
    full_max_size: int = 512,
    n_directions: int = 4,
    seed: int = 0,
) -> GradcheckResult:
    """Compare ``backward`` with central differences; return the max relative error.
    [autograd.gradcheck]

    ``f`` takes Tensors (one per entry of ``inputs``) and returns a Tensor. Inputs are
    converted to float64; those listed in ``wrt`` (default: all floating inputs) are
    checked: entry by entry when the total size is at most ``full_max_size``, otherwise
    along ``n_directions`` random Gaussian directions. Device inputs are checked on the
    device; a NaN in any gradient makes ``max_rel_error`` NaN (the check fails).
    """
    if not callable(f):
        raise TypeError(f"f: expected a function of Tensors, got {type(f).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < np.inf:
        raise ValueError(f"eps: expected a finite step > 0, got {eps!r}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions: expected an integer ≥ 1, got {n_directions!r}")
    if wrt is not None and any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(inputs) for i in wrt
    ):
        raise ValueError(f"wrt: expected indices of inputs in [0, {len(inputs)}), got {wrt!r}")
    device = _placement_of(inputs)
    arrays = [np.array(backend.to_numpy(x), copy=True, order="C") for x in inputs]
    for i, a in enumerate(arrays):
        if a.dtype.kind == "f":
            arrays[i] = a.astype(np.float64)
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    wrt = list(wrt)
    for i in wrt:
        if arrays[i].dtype.kind != "f":
            raise TypeError(f"wrt: input {i} has dtype {arrays[i].dtype}, not floating")
    rng = np.random.default_rng(seed)

    def put(a: np.ndarray) -> Tensor:
        return Tensor(backend.to_device(a, device))

    probe = f(*[put(a) for a in arrays])
    weights = None if probe.size == 1 else rng.standard_normal(probe.shape)

    def scalar_f(*ts: Tensor) -> Tensor:
        return _scalarize(f(*ts), weights)

    tensors = [
        Tensor(backend.to_device(a, device), requires_grad=(i in wrt)) for i, a in enumerate(arrays)
    ]
    out = scalar_f(*tensors)
    out.backward()
    analytic = [
        backend.to_numpy(tensors[i].grad) if tensors[i].grad is not None
        else np.zeros_like(arrays[i])
        for i in wrt
    ]  # fmt: skip

    total = sum(arrays[i].size for i in wrt)
    errors = []
    if total <= full_max_size:
        for i, g in zip(wrt, analytic):
            num = numerical_grad(f, arrays, i, eps, weights=weights, device=device)
            # An entry far smaller than the gradient's largest carries the finite-difference
            # rounding error of the largest (≈ u·|L|/ε), so it is judged against a floor of
            # 10⁻³ of the gradient's scale rather than against its own tiny magnitude.
            scale = max(
                float(np.max(np.abs(g), initial=0.0)), float(np.max(np.abs(num), initial=0.0))
            )
            errors.append(rel_error(g, num, atol=max(1e-8, 1e-3 * scale)))
        mode = "full"
    else:
        for i, g in zip(wrt, analytic):
            worst = 0.0
            for _ in range(n_directions):
                # v ~ N(0, I), not normalized: every entry moves by ~ε as in full mode (a
                # unit v would move each by ε/√n and the rounding error would grow with n)
                v = rng.standard_normal(arrays[i].shape)
                with no_grad():
                    shifted = list(arrays)
                    shifted[i] = arrays[i] + eps * v
                    up = _value(f, shifted, device)
                    shifted[i] = arrays[i] - eps * v
                    down = _value(f, shifted, device)
                # ⟨∇L, v⟩ ≈ (L(x + εv) − L(x − εv)) / 2ε
                fd = _contract(up, down, weights) / (2 * eps)
                an = float(np.sum(g * v))
                # E|⟨∇L, v⟩| ~ ‖∇L‖; as in full mode, a projection far below that (v nearly
                # orthogonal to ∇L) is judged against 10⁻³·‖∇L‖, not its own tiny size
                floor = max(1e-8, 1e-3 * float(np.linalg.norm(g)))
                # np.fmax would skip a NaN; a NaN error must stay NaN (the check fails)
                err = abs(an - fd) / max(abs(an), abs(fd), floor)
                worst = np.nan if np.isnan(err) or np.isnan(worst) else max(worst, err)
            errors.append(worst)
        mode = "directional"
    # np.max, not max(): Python's max skips a NaN or not depending on its position
    worst_all = float(np.max(errors)) if errors else 0.0
    return GradcheckResult(worst_all, tuple(errors), mode)


def _placement_of(inputs: Sequence[object]) -> str:
    """ "cupy" when any input lives on the device (the check then runs there)."""
    return "cupy" if any(backend.placement(x) == "cupy" for x in inputs) else "numpy"
