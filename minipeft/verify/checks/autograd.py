"""Checks for derivations/autograd.md: one per primitive op's VJP, the engine, gradcheck.

Each op check runs the op on small fixed-seed float64 inputs and folds two errors into one:
  * the forward against a NumPy/SciPy reference written here from the op's definition;
  * the VJP from ``backward`` against float64 central differences (``gradcheck``, every
    entry of every input).
The reported error is the larger of the two. The golden arrays are the inputs, the fixed
cotangent ḡ, the output and the gradients x̄ = ḡ·∂y/∂x that ``backward`` returns.
The ``autograd.gradcheck`` check validates the finite-difference estimator itself against
a closed-form gradient, so the op checks rest on something that was checked too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.special as sps

from ...autograd import ops
from ...autograd.gradcheck import gradcheck, numerical_grad, rel_error
from ...autograd.tensor import Tensor
from ..registry import Outcome, equation

TOL = 1e-6  # VJP vs central differences (float64, ε = 1e-6); forwards agree to ~1e-15


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(1000 + seed)


def _forward_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out − ref| / max(max |ref|, 1): relative to the output's scale."""
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return math.inf
    return float(np.max(np.abs(out - ref), initial=0.0) / max(np.max(np.abs(ref)), 1.0))


def _case(
    impl: Callable[..., Tensor],
    ref: Callable[..., np.ndarray],
    inputs: dict[str, np.ndarray],
    kw: dict[str, Any] | None = None,
    seed: int = 0,
) -> Outcome:
    """Forward vs ``ref`` and VJP vs central differences for ``impl(*inputs, **kw)``."""
    kw = kw or {}
    names, arrays = list(inputs), list(inputs.values())
    fwd = _forward_error(impl(*[Tensor(a) for a in arrays], **kw).data, ref(*arrays, **kw))
    grad_err = gradcheck(lambda *ts: impl(*ts, **kw), arrays, seed=seed).max_rel_error
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = impl(*ts, **kw)
    cot = _rng(seed + 500).standard_normal(out.shape)  # ḡ
    out.backward(cot)
    golden = dict(inputs)
    golden.update({k: np.asarray(v) for k, v in kw.items() if isinstance(v, np.ndarray)})
    golden.update(out=out.data, cotangent=cot)
    golden.update({f"grad_{n}": t.grad for n, t in zip(names, ts)})
    return Outcome(error=max(fwd, grad_err), arrays=golden)


def _merge(*outcomes: Outcome) -> Outcome:
    """Several cases of one equation: the worst error, the first case's golden arrays."""
    arrays = dict(outcomes[0].arrays)
    for i, o in enumerate(outcomes[1:], start=2):
        arrays.update({f"{k}_{i}": v for k, v in o.arrays.items()})
    return Outcome(error=max(o.error for o in outcomes), arrays=arrays)


def _away_from_zero(x: np.ndarray, lo: float = 0.5) -> np.ndarray:
    return np.where(x >= 0, lo + np.abs(x), -lo - np.abs(x))


def _positive(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return _rng(seed).uniform(0.2, 3.0, shape)


def _normal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return scale * _rng(seed).standard_normal(shape)


def _distinct(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values with no ties and gaps ≥ 0.05 (a random permutation of a grid)."""
    n = math.prod(shape)
    return (_rng(seed).permutation(n) * 0.05 - 0.6 * n * 0.05).reshape(shape)


def _ref_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _ref_cross_entropy(z: np.ndarray, targets: np.ndarray, ignore_index: int) -> np.ndarray:
    valid = targets != ignore_index
    logp = sps.log_softmax(z, axis=-1)
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return np.asarray(-picked[valid].mean())


def _ref_gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _dropout_fixed(x: Tensor, p: float, seed: int) -> Tensor:
    # the same generator state on every call: the mask is a constant of the function
    return ops.dropout(x, p, rng=np.random.default_rng(seed))


def _ref_dropout(x: np.ndarray, p: float, seed: int) -> np.ndarray:
    keep = np.random.default_rng(seed).random(x.shape) >= p
    return x * keep / (1 - p)


# (id, what, implementing Function, builder returning an Outcome)
_OPS: list[tuple[str, str, type, Callable[[], Outcome]]] = [
    ("ops.add", "y = a + b; ā = ḡ, b̄ = ḡ summed over broadcast axes", ops.Add,
     lambda: _case(ops.add, np.add, {"a": _normal((3, 1, 4), 1), "b": _normal((2, 4), 2)})),
    ("ops.sub", "y = a − b; ā = ḡ, b̄ = −ḡ (unbroadcast)", ops.Sub,
     lambda: _case(ops.sub, np.subtract, {"a": _normal((3, 4), 3), "b": _normal((4,), 4)})),
    ("ops.mul", "y = a ⊙ b; ā = ḡ ⊙ b, b̄ = ḡ ⊙ a (unbroadcast)", ops.Mul,
     lambda: _case(ops.mul, np.multiply, {"a": _normal((2, 3), 5), "b": _normal((2, 1), 6)})),
    ("ops.div", "y = a / b; ā = ḡ / b, b̄ = −ḡ ⊙ y / b", ops.Div,
     lambda: _case(ops.div, np.divide,
                   {"a": _normal((2, 3), 7), "b": _away_from_zero(_normal((3,), 8))})),
    ("ops.neg", "y = −x; x̄ = −ḡ", ops.Neg,
     lambda: _case(ops.neg, np.negative, {"x": _normal((2, 3), 9)})),
    ("ops.pow", "y = xᵖ; x̄ = ḡ ⊙ p·xᵖ⁻¹", ops.Pow,
     lambda: _merge(
         _case(ops.pow, lambda x, exponent: x**exponent, {"x": _positive((2, 3), 10)},
               {"exponent": 2.5}),
         _case(ops.pow, lambda x, exponent: x**exponent,
               {"x": _away_from_zero(_normal((2, 3), 11), 0.3)}, {"exponent": 3}),
     )),
    ("ops.exp", "y = eˣ; x̄ = ḡ ⊙ y", ops.Exp,
     lambda: _case(ops.exp, np.exp, {"x": _normal((2, 3), 12)})),
    ("ops.log", "y = ln x; x̄ = ḡ / x", ops.Log,
     lambda: _case(ops.log, np.log, {"x": _positive((2, 3), 13)})),
    ("ops.sqrt", "y = √x; x̄ = ḡ / 2y", ops.Sqrt,
     lambda: _case(ops.sqrt, np.sqrt, {"x": _positive((2, 3), 14)})),
    ("ops.tanh", "y = tanh x; x̄ = ḡ ⊙ (1 − y²)", ops.Tanh,
     lambda: _case(ops.tanh, np.tanh, {"x": _normal((2, 3), 15, 2.0)})),
    ("ops.sigmoid", "y = σ(x); x̄ = ḡ ⊙ y(1 − y) = ḡ ⊙ e^{−|x|}/(1 + e^{−|x|})²", ops.Sigmoid,
     lambda: _case(ops.sigmoid, sps.expit, {"x": _normal((2, 3), 16, 3.0)})),
    ("ops.relu", "y = max(x, 0); x̄ = ḡ ⊙ 1[x > 0]", ops.Relu,
     lambda: _case(ops.relu, lambda x: np.maximum(x, 0),
                   {"x": _away_from_zero(_normal((2, 3), 17), 0.1)})),
    ("ops.gelu", "GELU tanh form; x̄ = ḡ ⊙ [½(1 + t) + ½x(1 − t²)·c(1 + 3kx²)]", ops.Gelu,
     lambda: _case(ops.gelu, _ref_gelu_tanh, {"x": _normal((3, 4), 18, 2.0)})),
    ("ops.astype", "dtype cast; x̄ = ḡ cast back to x's dtype", ops.Cast,
     lambda: _check_astype()),
    ("ops.matmul", "Y = A·B (batched, broadcast, 1-D); Ā = ḡ·Bᵀ, B̄ = Aᵀ·ḡ (unbroadcast)",
     ops.MatMul,
     lambda: _merge(
         _case(ops.matmul, np.matmul,
               {"a": _normal((2, 1, 3, 4), 19), "b": _normal((3, 4, 2), 20)}),
         _case(ops.matmul, np.matmul, {"a": _normal((4,), 21), "b": _normal((2, 4, 3), 22)}),
         _case(ops.matmul, np.matmul, {"a": _normal((3, 4), 23), "b": _normal((4,), 24)}),
     )),
    ("ops.sum", "y = Σ_axes x (and mean = sum/n); x̄ = ḡ broadcast back", ops.Sum,
     lambda: _merge(
         _case(ops.sum, np.sum, {"x": _normal((2, 3, 4), 25)}, {"axis": (0, 2), "keepdims": True}),
         _case(ops.mean, np.mean, {"x": _normal((2, 3, 4), 26)}, {"axis": 1, "keepdims": False}),
     )),
    ("ops.max", "y = max_axes x; x̄ = ḡ ⊙ 1[x = y] / #ties", ops.Max,
     lambda: _check_max()),
    ("ops.var", "y = Σ(x − μ)²/(n − ddof); x̄ = ḡ ⊙ 2(x − μ)/(n − ddof)", ops.Var,
     lambda: _merge(
         _case(ops.var, np.var, {"x": _normal((3, 4), 27)}, {"axis": 1, "ddof": 1}),
         _case(ops.var, np.var, {"x": _normal((2, 3), 28)}, {"axis": None, "keepdims": True}),
     )),
    ("ops.reshape", "y = reshape(x); x̄ = reshape(ḡ) back", ops.Reshape,
     lambda: _case(ops.reshape, np.reshape, {"x": _normal((2, 3, 4), 29)}, {"shape": (4, -1)})),
    ("ops.transpose", "y = x permuted by π; x̄ = ḡ permuted by π⁻¹", ops.Transpose,
     lambda: _case(ops.transpose, np.transpose, {"x": _normal((2, 3, 4), 30)},
                   {"axes": (2, 0, 1)})),
    ("ops.getitem", "y = x[idx]; x̄ = 0 then x̄[idx] += ḡ (repeats accumulate)", ops.GetItem,
     lambda: _merge(
         _case(ops.getitem, lambda x, index: x[index], {"x": _normal((4, 3), 31)},
               {"index": (np.array([0, 2, 2, 3, 2]), slice(None, None, -1))}),
         _case(ops.getitem, lambda x, index: x[index], {"x": _normal((4, 3), 32)},
               {"index": (slice(1, None, 2), 1)}),
     )),
    ("ops.concat", "y = [x₁, x₂, …] along an axis (and stack); x̄ᵢ = slice of ḡ", ops.Concat,
     lambda: _merge(
         _case(lambda *xs, axis: ops.concat(xs, axis), lambda *xs, axis: np.concatenate(xs, axis),
               {"x1": _normal((2, 3), 33), "x2": _normal((2, 1), 34), "x3": _normal((2, 2), 35)},
               {"axis": 1}),
         _case(lambda *xs, axis: ops.stack(xs, axis), lambda *xs, axis: np.stack(xs, axis),
               {"x1": _normal((2, 3), 36), "x2": _normal((2, 3), 37)}, {"axis": -1}),
     )),
    ("ops.where", "y = cond ? a : b (and masked_fill); ā = ḡ ⊙ cond, b̄ = ḡ ⊙ ¬cond", ops.Where,
     lambda: _merge(
         _case(lambda a, b, cond: ops.where(cond, a, b), lambda a, b, cond: np.where(cond, a, b),
               {"a": _normal((3, 4), 38), "b": _normal((4,), 39)},
               {"cond": np.array([[True], [False], [True]])}),
         _case(ops.masked_fill, lambda x, mask, value: np.where(mask, value, x),
               {"x": _normal((2, 3), 40)},
               {"mask": np.array([[True, False, False], [False, False, True]]), "value": -1e9}),
     )),
    ("ops.embedding", "y = W[ids]; W̄ = 0 then W̄[ids] += ḡ (scatter-add)", ops.Embedding,
     lambda: _case(ops.embedding, lambda w, ids: w[ids], {"weight": _normal((5, 3), 41)},
                   {"ids": np.array([[1, 4, 1], [0, 1, 2]])})),
    ("ops.softmax", "y = softmax(x); x̄ = y ⊙ (ḡ − Σ ḡ ⊙ y)", ops.Softmax,
     lambda: _merge(
         _case(ops.softmax, lambda x, axis: sps.softmax(x, axis=axis), {"x": _normal((3, 5), 42)},
               {"axis": -1}),
         _case(ops.softmax, lambda x, axis: sps.softmax(x, axis=axis),
               {"x": _normal((3, 4), 43, 4.0)}, {"axis": 0}),
     )),
    ("ops.log_softmax", "y = x − logsumexp(x); x̄ = ḡ − softmax(x)·Σ ḡ", ops.LogSoftmax,
     lambda: _case(ops.log_softmax, lambda x, axis: sps.log_softmax(x, axis=axis),
                   {"x": _normal((3, 5), 44, 3.0)}, {"axis": -1})),
    ("ops.cross_entropy", "L = mean over valid rows of lse(z) − z_t; z̄ = (softmax − onehot)/n",
     ops.CrossEntropy,
     lambda: _case(ops.cross_entropy, _ref_cross_entropy, {"logits": _normal((2, 3, 4), 45)},
                   {"targets": np.array([[1, -100, 3], [0, 2, -100]]), "ignore_index": -100})),
    ("ops.layer_norm", "x̄ = r·(ĝ − mean ĝ − x̂·mean(ĝ ⊙ x̂)), γ̄ = Σ ḡ ⊙ x̂, β̄ = Σ ḡ",
     ops.LayerNorm,
     lambda: _case(ops.layer_norm, _ref_layer_norm,
                   {"x": _normal((2, 3, 5), 46), "weight": 1 + _normal((5,), 47, 0.3),
                    "bias": _normal((5,), 48)}, {"eps": 1e-5})),
    ("ops.dropout", "y = x ⊙ m/(1 − p); x̄ = ḡ ⊙ m/(1 − p), the forward's mask", ops.Dropout,
     lambda: _case(_dropout_fixed, _ref_dropout, {"x": _normal((4, 5), 49)},
                   {"p": 0.3, "seed": 7})),
]  # fmt: skip


def _check_astype() -> Outcome:
    x = _normal((2, 3), 50)
    x32 = ops.astype(Tensor(x), np.float32).data
    err = float(np.max(np.abs(x32 - x.astype(np.float32))))  # round-to-nearest, exactly
    t = Tensor(x.astype(np.float32), requires_grad=True)
    cot = _normal((2, 3), 51)
    ops.astype(t, np.float64).backward(cot)
    err = max(err, float(t.grad.dtype != np.float32))  # x̄ returns to x's dtype
    err = max(err, rel_error(t.grad, cot.astype(np.float32)))
    out = _case(lambda a: ops.astype(a, np.float64), lambda a: a, {"x": x})
    out.arrays.update(x32=x32, grad_x32=t.grad)
    return Outcome(error=max(err, out.error), arrays=out.arrays)


def _check_max() -> Outcome:
    smooth = _case(ops.max, np.max, {"x": _distinct((3, 4), 52)}, {"axis": 1, "keepdims": True})
    # ties are not differentiable; the convention (share equally) is checked exactly
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    ops.max(x, axis=1).sum().backward()
    expected = np.array([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    tie_err = float(np.max(np.abs(x.grad - expected)))
    smooth.arrays.update(x_ties=x.data, grad_x_ties=x.grad)
    return Outcome(error=max(smooth.error, tie_err), arrays=smooth.arrays)


def _register(id_: str, what: str, fn: type, build: Callable[[], Outcome]) -> None:
    equation(id_, what=what, derivation="autograd.md", implements=fn, tol=TOL)(build)


for _id, _what, _fn, _build in _OPS:
    _register(_id, _what, _fn, _build)


# ---------------------------------------------------------------------------- engine
def _engine_graph(x: Tensor, w: Tensor) -> Tensor:
    """A graph with a shared node (h feeds two branches) and a reused leaf (x twice)."""
    h = ops.tanh(ops.matmul(x, w.T))  # (3, 2)
    return (h * h.exp()).sum() + (x * x).sum() * 0.25


@equation(
    "autograd.backward",
    what="reverse mode: x̄ = Σ over uses of the VJPs, in reverse topological order",
    derivation="autograd.md",
    implements=Tensor.backward,
    tol=1e-7,
)
def _check_backward() -> Outcome:
    x, w = _normal((3, 4), 60), _normal((2, 4), 61)
    # closed form: with u = x·wᵀ, h = tanh u, L = Σ h·eʰ + ¼Σx²:
    # ∂L/∂h = eʰ(1 + h), ∂L/∂u = ∂L/∂h ⊙ (1 − h²), x̄ = ū·w + ½x, w̄ = ūᵀ·x
    h = np.tanh(x @ w.T)
    ubar = np.exp(h) * (1 + h) * (1 - h * h)
    gx, gw = ubar @ w + 0.5 * x, ubar.T @ x
    tx, tw = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    loss = _engine_graph(tx, tw)
    loss.backward()
    err = max(rel_error(tx.grad, gx), rel_error(tw.grad, gw))
    err = max(err, gradcheck(_engine_graph, [x, w]).max_rel_error)
    return Outcome(error=err, arrays={"x": x, "w": w, "loss": loss.data, "grad_x": tx.grad,
                                      "grad_w": tw.grad})  # fmt: skip


@equation(
    "autograd.gradcheck",
    what="central differences in float64 reach ~1e-10 on a closed-form gradient",
    derivation="autograd.md",
    implements=gradcheck,
    tol=1e-9,
)
def _check_gradcheck() -> Outcome:
    # f(x) = Σ x³/3 + e^{x/2}, so ∇f = x² + ½e^{x/2} in closed form (never 0, so a
    # relative error is meaningful for every entry)
    x = _rng(70).uniform(-1.5, 1.5, 12)

    def f(t: Tensor) -> Tensor:  # the terms of the sum; numerical_grad contracts with w = 1
        return (t * t * t) * (1 / 3) + (t * 0.5).exp()

    closed = x * x + 0.5 * np.exp(0.5 * x)
    # ε = 1e-6: truncation ε²·f'''/6 ~ 4e-13; rounding u·|fₖ|/ε ~ 1e-10 because the terms are
    # differenced one by one (differencing the summed f would pay u·|Σf|/ε ~ 1e-9)
    fd = numerical_grad(f, [x], 0, weights=np.ones_like(x))
    err = rel_error(fd, closed)
    # ... and the float32 estimate of the same derivative is ~4 orders worse (not checked
    # against the tolerance, exported so the notebook's plot can be reproduced)
    x32 = x.astype(np.float32)
    e32 = np.float32(1e-3)
    up = (x32 + e32) ** 3 / 3 + np.exp(0.5 * (x32 + e32))
    down = (x32 - e32) ** 3 / 3 + np.exp(0.5 * (x32 - e32))
    f32 = (up - down) / (2 * e32)
    return Outcome(
        error=err,
        arrays={
            "x": x,
            "grad_closed_form": closed,
            "grad_fd_float64": fd,
            "grad_fd_float32": f32.astype(np.float64),
            "rel_error_fd_float32": np.array(rel_error(f32, closed)),  # ~1e-4
        },
    )
