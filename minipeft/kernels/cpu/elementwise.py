"""Numba kernels for the elementwise hot spots of a training step, each beside its NumPy
reference (derivations/kernels.md; the equations themselves: derivations/autograd.md).

GELU, tanh form (GPT-2's ``gelu_new``), with c = √(2/π), k = 0.044715:

    u = c(x + k x³),   s = σ(2u) = ½(1 + tanh u)
    y = x·s                                  (= ½x(1 + tanh u))
    y' = s + 2x·s(1 − s)·c(1 + 3k x²)        (= ½(1 + t) + ½x(1 − t²)·u')

σ(2u) is evaluated as 1/(1 + e) for u ≥ 0 and e/(1 + e) for u < 0, with e = e^{−|2u|}:
it never overflows and keeps full relative accuracy in both tails (``ops.Gelu`` explains
why the tanh form does not). x is clipped to ±20 inside u only (u(±20) ≈ ±301, where σ is
exactly 0 or 1), so x³ cannot overflow.

The NumPy reference ``gelu_reference`` evaluates that with array operations in the input's
dtype (float32 arithmetic for float32 input): about a dozen full-size temporaries, and its
backward needs x and s again. ``gelu_fused`` computes y and y' together and returns y', so
that backward is one product, x̄ = ḡ ⊙ y': one saved array, the size of x. Each element
goes through the reference's operations in the reference's order, in float64, rounded once
to the input's dtype:

* float64 input: the same arithmetic, and the same NumPy ``exp``: equal to the reference
  bit for bit (tested);
* float32 input: the kernel is the more accurate of the two (one rounding instead of a
  dozen; the float32 reference loses up to ~200 ulp of y in the tails, where e^{−|2u|} has
  condition number |2u| ≈ 300, and many ulp of y' near its zero at x ≈ −0.75, where its two
  terms cancel). The kernel is within 1 ulp of the float64 reference rounded to float32,
  and within the float32 reference's own error of it (tests/test_kernels_elementwise.py).

Speed notes. ``math.exp`` inside a Numba loop is a scalar libm call, ~15× slower than
NumPy's vectorized ``exp``; so the exponential is one NumPy call between two Numba sweeps,
chunk by chunk through a small float64 scratch that stays in cache (an x-sized float64
buffer cost ~1200 page faults per 10⁶ elements and 5× the time).
``error_model="numpy"`` (IEEE division, as NumPy: no ZeroDivisionError check) lets LLVM
vectorize the sweeps; the branch of σ is a select, so random signs cost no mispredictions.

``@njit(cache=True, error_model="numpy")``, one thread (no ``parallel``), no ``fastmath``
(no reassociation, no contraction into FMA: the operations are the reference's). With
``NUMBA_DISABLE_JIT=1`` the same loops run as Python and give the same values.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit

from ... import backend
from ...backend import Array

__all__ = [
    "GELU_C", "GELU_CHUNK", "GELU_CLIP", "GELU_K", "JIT", "gelu_fused", "gelu_reference",
    "layer_norm_backward_fused", "layer_norm_backward_reference", "layer_norm_fused",
    "layer_norm_reference", "scatter_add_rows", "scatter_add_rows_reference",
]  # fmt: skip

#: whether Numba compiles (False under ``NUMBA_DISABLE_JIT=1``: the loops would run as Python)
JIT = not numba.config.DISABLE_JIT

GELU_C = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715
GELU_CLIP = 20.0  # u(±20) ≈ ±301: σ(2u) is exactly 0 or 1 there in float32 and float64


# ---------------------------------------------------------------------------- GELU
def gelu_reference(x: Array, need_grad: bool = True) -> tuple[Array, Array | None]:
    """(y, y') of the tanh-form GELU with array operations in x's dtype (NumPy or CuPy);
    y' is None when ``need_grad`` is false (derivations/autograd.md, ops.gelu)."""
    xp = backend.xp_of(x)
    # s depends on x only where it is not saturated; clipping keeps x³ from overflowing
    xc = xp.clip(x, -GELU_CLIP, GELU_CLIP)
    # z = 2u = 2c(x + k x³)
    z = 2 * GELU_C * (xc + GELU_K * xc * xc * xc)
    # s = σ(z) = 1/(1 + e) for z ≥ 0, e/(1 + e) for z < 0, with e = e^{−|z|}
    e = xp.exp(-xp.abs(z))
    den = 1 + e
    s = xp.where(z >= 0, 1 / den, e / den)
    y = x * s  # y = ½x(1 + t) = x·s
    if not need_grad:
        return y, None
    # du/dx = c(1 + 3k x²)
    dudx = GELU_C * (1 + 3 * GELU_K * xc * xc)
    # y' = ½(1 + t) + ½x(1 − t²)·du/dx = s + 2x·s(1 − s)·du/dx
    return y, s + 2 * x * (s * (1 - s)) * dudx


@njit(cache=True, error_model="numpy")
def _gelu_exponent(x: Array, w: Array) -> None:  # pragma: no cover - compiled
    """w[i] = −|z_i| with z = 2u = 2c(x + k x³), x clipped to ±20, in float64."""
    c = math.sqrt(2.0 / math.pi)
    k = 0.044715
    for i in range(x.shape[0]):
        xc = _clip(np.float64(x[i]))
        # z = 2u = 2c(x + k x³)
        z = 2.0 * c * (xc + k * xc * xc * xc)
        w[i] = -abs(z)


@njit(cache=True, error_model="numpy")
def _clip(xi: float) -> float:  # pragma: no cover - compiled
    """x clipped to ±20; NaN passes through both comparisons unchanged, as in np.clip."""
    if xi > 20.0:
        return 20.0
    if xi < -20.0:
        return -20.0
    return xi


@njit(cache=True, error_model="numpy")
def _gelu_from_exp(  # pragma: no cover - compiled
    x: Array, e: Array, y: Array, dy: Array, need_grad: bool
) -> None:
    """y[i] = GELU(x[i]) and, if ``need_grad``, dy[i] = GELU'(x[i]) from e[i] = e^{−|2u|},
    in float64 with ``gelu_reference``'s operations, rounded once to y's dtype."""
    c = math.sqrt(2.0 / math.pi)
    k = 0.044715
    for i in range(x.shape[0]):
        xi = np.float64(x[i])
        xc = _clip(xi)
        z = 2.0 * c * (xc + k * xc * xc * xc)  # recomputed: its sign picks the branch
        ei = e[i]
        den = 1.0 + ei
        # s = σ(z) = 1/(1 + e) for z ≥ 0, e/(1 + e) for z < 0 (a select, then one division)
        s = (1.0 if z >= 0.0 else ei) / den
        # y = x·s
        y[i] = xi * s
        if need_grad:
            # y' = s + 2x·s(1 − s)·du/dx,  du/dx = c(1 + 3k x²)
            dudx = c * (1.0 + 3.0 * k * xc * xc)
            dy[i] = s + 2.0 * xi * (s * (1.0 - s)) * dudx


#: elements per sweep of ``gelu_fused``: its float64 scratch (256 KiB) stays in cache and is
#: reused, where one x-sized float64 buffer costs a page fault per 4 KiB on every call
GELU_CHUNK = 32768


def gelu_fused(x: np.ndarray, need_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(y, y') of the tanh-form GELU, fused (Numba); equals ``gelu_reference`` within
    a few ulp of x's dtype (float32 or float64 NumPy arrays).   [kernels.gelu_fused]

    Per chunk of ``GELU_CHUNK`` elements, three sweeps: the exponent −|2u| (Numba), its
    exponential (NumPy's vectorized ``exp``, the reference's own: a scalar ``exp`` in a Numba
    loop costs ~15× more), then y and y' together (Numba). All in float64, rounded once to
    x's dtype.
    """
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"x: expected a float32 or float64 NumPy array, got "
            f"{type(x).__name__} of dtype {getattr(x, 'dtype', None)}"
        )
    flat = np.ascontiguousarray(x).reshape(-1)  # (N,) — a view when x is C-contiguous
    n = flat.shape[0]
    y = np.empty_like(flat)
    dy = np.empty_like(flat) if need_grad else np.empty(0, dtype=x.dtype)
    scratch = np.empty(min(n, GELU_CHUNK))  # float64
    for a in range(0, n, GELU_CHUNK):
        b = min(a + GELU_CHUNK, n)
        e = scratch[: b - a]
        _gelu_exponent(flat[a:b], e)  # e = −|2u|
        np.exp(e, out=e)  # e = e^{−|2u|}
        _gelu_from_exp(flat[a:b], e, y[a:b], dy[a:b] if need_grad else dy, need_grad)
    return y.reshape(x.shape), (dy.reshape(x.shape) if need_grad else None)


# ---------------------------------------------------------------------------- LayerNorm
def layer_norm_reference(
    x: Array, weight: Array, bias: Array, eps: float
) -> tuple[Array, Array, Array]:
    """LayerNorm over the last axis with array operations in x's dtype (NumPy or CuPy):
    returns (y, x̂, r) with r = 1/√(σ² + ε) of shape (..., 1) (derivations/autograd.md,
    ops.layer_norm)."""
    xp = backend.xp_of(x)
    mu = x.mean(axis=-1, keepdims=True)  # μ = mean(x)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)  # σ² = mean((x − μ)²)
    rstd = 1.0 / xp.sqrt(var + eps)  # r = 1/√(σ² + ε)
    xhat = xc * rstd  # x̂ = (x − μ)·r
    return xhat * weight + bias, xhat, rstd  # y = x̂ ⊙ γ + β


def layer_norm_backward_reference(
    g: Array, xhat: Array, rstd: Array, weight: Array, needs: tuple[bool, bool, bool]
) -> tuple[Array | None, Array | None, Array | None]:
    """(x̄, γ̄, β̄) of LayerNorm from ḡ, x̂ and r, each only where ``needs`` says so:
    ĝ = ḡ ⊙ γ,  x̄ = r·(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)),  γ̄ = Σ_rows ḡ ⊙ x̂,  β̄ = Σ_rows ḡ."""
    lead = tuple(range(g.ndim - 1))
    gx = gw = gb = None
    if needs[0]:
        gh = g * weight
        gx = rstd * (
            gh - gh.mean(axis=-1, keepdims=True) - xhat * (gh * xhat).mean(axis=-1, keepdims=True)
        )
    if needs[1]:
        gw = (g * xhat).sum(axis=lead)
    if needs[2]:
        gb = g.sum(axis=lead)
    return gx, gw, gb


@njit(cache=True, error_model="numpy")
def _sum8(a: Array, b: Array) -> float:  # pragma: no cover - compiled
    """Σⱼ aⱼ·bⱼ in float64 over eight interleaved partial sums (as NumPy's pairwise sum
    starts): rounding error ~ (n/8)·2⁻⁵³·Σ|aⱼbⱼ| instead of n·2⁻⁵³, and eight independent
    additions in flight."""
    n = a.shape[0]
    r0 = r1 = r2 = r3 = r4 = r5 = r6 = r7 = 0.0
    m = n - n % 8
    for j in range(0, m, 8):
        r0 += a[j] * b[j]
        r1 += a[j + 1] * b[j + 1]
        r2 += a[j + 2] * b[j + 2]
        r3 += a[j + 3] * b[j + 3]
        r4 += a[j + 4] * b[j + 4]
        r5 += a[j + 5] * b[j + 5]
        r6 += a[j + 6] * b[j + 6]
        r7 += a[j + 7] * b[j + 7]
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for j in range(m, n):
        s += a[j] * b[j]
    return s


@njit(cache=True, error_model="numpy")
def _layer_norm_forward_kernel(  # pragma: no cover - compiled
    x: Array, w: Array, b: Array, eps: float, y: Array, xhat: Array, rstd: Array
) -> None:
    """Row by row, in float64: μ, σ², r, x̂ (stored in x's dtype), y = x̂ ⊙ γ + β."""
    n, d = x.shape
    xc = np.empty(d)  # one row of x − μ in float64
    one = np.ones(d)
    for i in range(n):
        for j in range(d):
            xc[j] = x[i, j]
        mu = _sum8(xc, one) / d  # μ = mean(x)
        for j in range(d):
            xc[j] -= mu
        var = _sum8(xc, xc) / d  # σ² = mean((x − μ)²)
        r = 1.0 / math.sqrt(var + eps)  # r = 1/√(σ² + ε)
        rstd[i] = r
        for j in range(d):
            xh = xc[j] * r  # x̂ = (x − μ)·r
            xhat[i, j] = xh
            y[i, j] = xh * w[j] + b[j]  # y = x̂ ⊙ γ + β


@njit(cache=True, error_model="numpy")
def _layer_norm_backward_kernel(  # pragma: no cover - compiled
    g: Array,
    xhat: Array,
    rstd: Array,
    w: Array,
    gx: Array,
    gw: Array,
    gb: Array,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> None:
    """Row by row, in float64: x̄ (stored in g's dtype); γ̄ and β̄ summed into float64 rows."""
    n, d = g.shape
    gh = np.empty(d)  # one row of ĝ = ḡ ⊙ γ in float64
    xh = np.empty(d)  # the same row of x̂ in float64
    one = np.ones(d)
    for i in range(n):
        if need_x:
            for j in range(d):
                gh[j] = np.float64(g[i, j]) * w[j]
                xh[j] = xhat[i, j]
            a = _sum8(gh, one) / d  # mean(ĝ)
            c = _sum8(gh, xh) / d  # mean(ĝ ⊙ x̂)
            r = rstd[i]
            for j in range(d):
                # x̄ = r·(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))
                gx[i, j] = r * (gh[j] - a - xh[j] * c)
        if need_w:
            for j in range(d):
                gw[j] += np.float64(g[i, j]) * xhat[i, j]  # γ̄ = Σ_rows ḡ ⊙ x̂
        if need_b:
            for j in range(d):
                gb[j] += g[i, j]  # β̄ = Σ_rows ḡ


def layer_norm_fused(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``layer_norm_reference`` in one Numba pass per row, in float64 (rounded once to x's
    dtype): (y, x̂ in x's dtype, r float64 of shape (..., 1)).   [kernels.layer_norm_fused]

    Backward: ``layer_norm_backward_fused``."""
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)  # (N, D)
    y = np.empty_like(x2)
    xhat = np.empty_like(x2)
    rstd = np.empty(x2.shape[0])
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    _layer_norm_forward_kernel(x2, w, b, float(eps), y, xhat, rstd)
    return y.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape((*x.shape[:-1], 1))


def layer_norm_backward_fused(
    g: np.ndarray,
    xhat: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray,
    needs: tuple[bool, bool, bool],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``layer_norm_backward_reference`` in one Numba pass per row, in float64; γ̄ and β̄
    are summed over the rows in float64 and rounded once to g's dtype."""
    d = g.shape[-1]
    g2 = np.ascontiguousarray(g).reshape(-1, d)  # (N, D)
    xh2 = np.ascontiguousarray(xhat).reshape(-1, d)  # (N, D)
    r = np.ascontiguousarray(rstd, dtype=np.float64).reshape(-1)  # (N,)
    w = np.asarray(weight, dtype=np.float64)
    gx = np.empty_like(g2) if needs[0] else np.empty((0, d), dtype=g.dtype)
    gw = np.zeros(d)
    gb = np.zeros(d)
    _layer_norm_backward_kernel(g2, xh2, r, w, gx, gw, gb, needs[0], needs[1], needs[2])
    return (
        gx.reshape(g.shape) if needs[0] else None,
        gw.astype(g.dtype) if needs[1] else None,
        gb.astype(g.dtype) if needs[2] else None,
    )


# ---------------------------------------------------------------------------- scatter-add
def scatter_add_rows_reference(out: Array, ids: Array, g: Array) -> None:
    """out[ids[i]] += g[i] for every i, repeated ids accumulating (``np.add.at``): the
    embedding's VJP W̄[ids] += ḡ (derivations/autograd.md, ops.embedding)."""
    backend.scatter_add(out, ids, g)


@njit(cache=True, error_model="numpy")
def _scatter_add_rows_kernel(out: Array, ids: Array, g: Array) -> None:  # pragma: no cover
    for i in range(ids.shape[0]):
        r = ids[i]
        for j in range(g.shape[1]):
            out[r, j] += g[i, j]


def scatter_add_rows(out: np.ndarray, ids: np.ndarray, g: np.ndarray) -> None:
    """``scatter_add_rows_reference`` as a Numba loop, rows in the order of ``ids``: the
    same additions in the same order, so ``np.add.at``'s sums bit for bit, ~50× faster.
    out (V, D) C-contiguous, ids (N,) integers in [0, V), g (N, D) of out's dtype.
    [kernels.scatter_add_rows]"""
    if out.ndim != 2 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous (V, D) array, got shape {out.shape}")
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TypeError(f"ids: expected 1-D integers, got shape {ids.shape} dtype {ids.dtype}")
    if g.shape != (ids.shape[0], out.shape[1]) or g.dtype != out.dtype:
        raise ValueError(
            f"g: expected shape {(ids.shape[0], out.shape[1])} and dtype {out.dtype}, "
            f"got {g.shape} and {g.dtype}"
        )
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= out.shape[0]):
        raise ValueError(f"ids: values must lie in [0, {out.shape[0]})")
    _scatter_add_rows_kernel(out, ids, np.ascontiguousarray(g))
