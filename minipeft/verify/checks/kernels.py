"""Checks for derivations/kernels.md: the split VJP (central differences) and the fused
elementwise kernels against references written independently of them.

* ``ops.split``: pieces against ``np.split``, x̄ against float64 central differences with
  one piece unused (its part of x̄ must be exactly 0).
* ``kernels.gelu_fused``: y and y' against the closed form written here with SciPy's
  ``expit`` (float64), and the float32 kernel against that float64 value (within 1 ulp).
* ``kernels.layer_norm_fused``: y, x̄, γ̄, β̄ against the textbook formulas written here in
  extended precision (``np.longdouble``).
* ``kernels.scatter_add_rows``: against ``np.add.at`` bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special as sps

from ...autograd import ops
from ...autograd.gradcheck import gradcheck
from ...autograd.tensor import Tensor
from ...kernels.cpu import elementwise as ew
from ..registry import Outcome, equation

_C, _K = math.sqrt(2.0 / math.pi), 0.044715


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a − ref| / max(max |ref|, 1)."""
    a64, r64 = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(a64 - r64), initial=0.0) / max(np.max(np.abs(r64)), 1.0))


@equation(
    "ops.split",
    what="y₁…yₙ = consecutive pieces of x; x̄ = concat(ȳ₁, …, ȳₙ), 0 for an unused piece",
    derivation="kernels.md",
    implements=ops.Split,
    tol=1e-6,
)
def _check_split() -> Outcome:
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((3, 7))
    sizes, axis = [2, 1, 4], 1
    w = [rng.standard_normal((3, s)) for s in sizes]

    def f(t: Tensor) -> Tensor:
        a, _unused, c = ops.split(t, sizes, axis=axis)
        return (a * a * w[0]).sum() + (c * w[2]).sum()  # the middle piece is not used

    pieces = ops.split(Tensor(x), sizes, axis=axis)
    fwd = max(
        _rel(p.data, e) for p, e in zip(pieces, np.split(x, np.cumsum(sizes)[:-1], axis=axis))
    )
    err = gradcheck(f, [x]).max_rel_error
    t = Tensor(x, requires_grad=True)
    f(t).backward()
    if np.any(t.grad[:, 2:3] != 0):  # the unused piece passes exactly zero
        err = math.inf
    return Outcome(error=max(fwd, err), arrays={"x": x, "grad_x": t.grad})


@equation(
    "kernels.gelu_fused",
    what="fused GELU: y = x·σ(2u), y' = s + 2x·s(1 − s)·u' in one pass; float32 rounded once",
    derivation="kernels.md",
    implements=ew.gelu_fused,
    tol=1e-14,
)
def _check_gelu_fused() -> Outcome:
    x = np.linspace(-6.0, 8.0, 57)
    u = _C * (x + _K * x**3)
    s = sps.expit(2 * u)  # ½(1 + tanh u), accurate in both tails
    y_ref = x * s
    dy_ref = s + 2 * x * s * (1 - s) * _C * (1 + 3 * _K * x**2)
    y, dy = ew.gelu_fused(x)
    err = max(_rel(y, y_ref), _rel(dy, dy_ref))
    # float32: the float64 value rounded once — within 1 float32 ulp, i.e. 2⁻²³ relative,
    # reported in units of the tolerance's scale (1 ulp ↦ 1e-15)
    y32, dy32 = ew.gelu_fused(x.astype(np.float32))
    y64, dy64 = ew.gelu_fused(x.astype(np.float32).astype(np.float64))
    for a, ref in ((y32, y64), (dy32, dy64)):
        ulps = np.abs(a - ref.astype(np.float32)) / np.spacing(np.abs(ref.astype(np.float32)))
        err = max(err, float(ulps.max()) * 1e-15)
    return Outcome(error=err, arrays={"x": x, "y": y, "dy_dx": dy})


@equation(
    "kernels.layer_norm_fused",
    what="LayerNorm row by row in float64: y, x̄, γ̄, β̄ as derived, to a few float64 roundings",
    derivation="kernels.md",
    implements=ew.layer_norm_fused,
    tol=1e-14,
)
def _check_layer_norm_fused() -> Outcome:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 12)) * 2.0 + 0.5
    w, b = 1.0 + 0.2 * rng.standard_normal(12), 0.1 * rng.standard_normal(12)
    g = rng.standard_normal((5, 12))
    eps = 1e-5
    # the formulas of kernels.md §3 in extended precision
    L = np.longdouble
    xl, wl, gl = x.astype(L), w.astype(L), g.astype(L)
    mu = xl.mean(-1, keepdims=True)
    r = 1 / np.sqrt(((xl - mu) ** 2).mean(-1, keepdims=True) + L(eps))
    xh = (xl - mu) * r
    gh = gl * wl
    ref = {
        "y": xh * wl + b.astype(L),
        "grad_x": r * (gh - gh.mean(-1, keepdims=True) - xh * (gh * xh).mean(-1, keepdims=True)),
        "grad_w": (gl * xh).sum(0),
        "grad_b": gl.sum(0),
    }
    y, xhat, rstd = ew.layer_norm_fused(x, w, b, eps)
    gx, gw, gb = ew.layer_norm_backward_fused(g, xhat, rstd, w, (True, True, True))
    got = {"y": y, "grad_x": gx, "grad_w": gw, "grad_b": gb}
    err = max(_rel(got[k], ref[k].astype(np.float64)) for k in ref)
    return Outcome(error=err, arrays={"x": x, "weight": w, "bias": b, "cotangent": g, **got})


@equation(
    "kernels.scatter_add_rows",
    what="W̄[idsᵢ] += ḡᵢ row by row, repeated ids accumulating: np.add.at bit for bit",
    derivation="kernels.md",
    implements=ew.scatter_add_rows,
    tol=0.0,
)
def _check_scatter_add_rows() -> Outcome:
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 4, 9)
    g = rng.standard_normal((9, 3)) * 10.0 ** rng.integers(-4, 5, (9, 1))
    ref = np.zeros((4, 3))
    np.add.at(ref, ids, g)
    out = np.zeros((4, 3))
    ew.scatter_add_rows(out, ids, g)
    err = 0.0 if out.tobytes() == ref.tobytes() else max(_rel(out, ref), 1e-300)
    return Outcome(error=err, arrays={"ids": ids, "g": g, "grad_weight": out})
