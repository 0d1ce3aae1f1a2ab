"""Differentiable operations: one Function per op, forward and backward side by side.

Notation (derivations/autograd.md): y = f(x₁, …, xₙ) is the forward, ḡ = ∂L/∂y the
upstream gradient, and backward returns x̄ᵢ = ∂L/∂xᵢ = ḡ · ∂y/∂xᵢ (a vector-Jacobian
product). Each docstring names the equation id of its VJP in the derivation.

Broadcasting: a binary op broadcasts like NumPy; its backward sums ḡ over the broadcast
axes (``unbroadcast``) so that x̄ has x's shape.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import backend
from ..backend import Array
from .tensor import Function, Tensor, _coerce_inputs, as_tensor, data_of

__all__ = [
    "add", "astype", "concat", "cross_entropy", "div", "dropout", "embedding", "exp", "gelu",
    "getitem", "layer_norm", "log", "log_softmax", "masked_fill", "matmul", "max", "mean",
    "mul", "neg", "pow", "relu", "reshape", "sigmoid", "softmax", "split", "sqrt", "stack", "sub",
    "sum", "tanh", "transpose", "unbroadcast", "var", "where",
]  # fmt: skip


# ---------------------------------------------------------------------------- helpers
def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    if lead > 0:
        grad = grad.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def _check_same_float(op: str, a: Tensor, b: Tensor) -> None:
    if a.dtype.kind == "f" and b.dtype.kind == "f" and a.dtype != b.dtype:
        raise TypeError(
            f"{op}: operands must share a floating dtype, got {a.dtype} and {b.dtype} "
            "(cast one with .astype)"
        )


def _float_peer(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cast an integer/boolean operand (a constant: it cannot require grad) to the other's
    floating dtype, so that float32 ⊕ int64 stays float32 instead of promoting to float64."""
    if a.dtype.kind == "f" and b.dtype.kind in "iub":
        b = Tensor(b.data.astype(a.dtype))
    elif b.dtype.kind == "f" and a.dtype.kind in "iub":
        a = Tensor(a.data.astype(b.dtype))
    return a, b


def _binary(fn: type[Function], op: str, a: Any, b: Any) -> Tensor:
    ta, tb = _float_peer(*_coerce_inputs((a, b)))
    _check_same_float(op, ta, tb)
    try:
        return fn.apply(ta, tb)
    except ValueError as exc:
        if "broadcast" in str(exc):
            raise ValueError(f"{op}: shapes {ta.shape} and {tb.shape} do not broadcast") from None
        raise


def _normalize_axis(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    out = []
    for a in axes:
        if not isinstance(a, int | np.integer) or not -ndim <= a < ndim:
            raise ValueError(f"axis: {a!r} is out of range for a tensor with {ndim} dimensions")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis: repeated axis in {axis}")
    return tuple(sorted(out))


def _expand_reduced(g: Any, shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> Any:
    """Reshape a reduced gradient so it broadcasts back against ``shape``."""
    if not keepdims:
        g = g.reshape([1 if i in axes else n for i, n in enumerate(shape)])
    return g


# ---------------------------------------------------------------------------- elementwise
class Add(Function):
    """y = a + b.   ā = ḡ, b̄ = ḡ (summed over broadcast axes).   [ops.add]"""

    def forward(self, a: Array, b: Array) -> Array:
        self.sa, self.sb = a.shape, b.shape
        return a + b

    def backward(self, g: Array) -> Any:
        ga = unbroadcast(g, self.sa) if self.needs_input_grad[0] else None
        gb = unbroadcast(g, self.sb) if self.needs_input_grad[1] else None
        return ga, gb


class Sub(Function):
    """y = a − b.   ā = ḡ, b̄ = −ḡ.   [ops.sub]"""

    def forward(self, a: Array, b: Array) -> Array:
        self.sa, self.sb = a.shape, b.shape
        return a - b

    def backward(self, g: Array) -> Any:
        ga = unbroadcast(g, self.sa) if self.needs_input_grad[0] else None
        gb = -unbroadcast(g, self.sb) if self.needs_input_grad[1] else None
        return ga, gb


class Mul(Function):
    """y = a ⊙ b.   ā = ḡ ⊙ b, b̄ = ḡ ⊙ a.   [ops.mul]"""

    def forward(self, a: Array, b: Array) -> Array:
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if self.needs_input_grad[0] else None
        self.sa, self.sb = a.shape, b.shape
        return a * b

    def backward(self, g: Array) -> Any:
        ga = unbroadcast(g * self.b, self.sa) if self.needs_input_grad[0] else None
        gb = unbroadcast(g * self.a, self.sb) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """y = a / b.   ā = ḡ / b, b̄ = −ḡ ⊙ a / b² = −ḡ ⊙ y / b.   [ops.div]"""

    def forward(self, a: Array, b: Array) -> Array:
        y = a / b
        self.b, self.y = b, (y if self.needs_input_grad[1] else None)
        self.sa, self.sb = a.shape, b.shape
        return y

    def backward(self, g: Array) -> Any:
        ga = unbroadcast(g / self.b, self.sa) if self.needs_input_grad[0] else None
        gb = unbroadcast(-g * self.y / self.b, self.sb) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    """y = −x.   x̄ = −ḡ.   [ops.neg]"""

    def forward(self, x: Array) -> Array:
        return -x

    def backward(self, g: Array) -> Any:
        return -g


class Pow(Function):
    """y = xᵖ for a constant exponent p.   x̄ = ḡ ⊙ p·xᵖ⁻¹.   [ops.pow]"""

    def forward(self, x: Array, p: Any) -> Array:
        self.x, self.p = x, p
        return x**p

    def backward(self, g: Array) -> Any:
        p = self.p
        return g * (p * self.x ** (p - 1)) if p != 0 else g * 0


class Exp(Function):
    """y = eˣ.   x̄ = ḡ ⊙ y.   [ops.exp]"""

    def forward(self, x: Array) -> Array:
        self.y = backend.xp_of(x).exp(x)
        return self.y

    def backward(self, g: Array) -> Any:
        return g * self.y


class Log(Function):
    """y = ln x.   x̄ = ḡ / x.   [ops.log]"""

    def forward(self, x: Array) -> Array:
        self.x = x
        return backend.xp_of(x).log(x)

    def backward(self, g: Array) -> Any:
        return g / self.x


class Sqrt(Function):
    """y = √x.   x̄ = ḡ / (2y).   [ops.sqrt]"""

    def forward(self, x: Array) -> Array:
        self.y = backend.xp_of(x).sqrt(x)
        return self.y

    def backward(self, g: Array) -> Any:
        return g / (2 * self.y)


class Tanh(Function):
    """y = tanh x.   x̄ = ḡ ⊙ (1 − y²).   [ops.tanh]"""

    def forward(self, x: Array) -> Array:
        self.y = backend.xp_of(x).tanh(x)
        return self.y

    def backward(self, g: Array) -> Any:
        return g * (1 - self.y * self.y)


def _stable_sigmoid(z: Array) -> tuple[Array, Array, Array]:
    """σ(z) to full relative accuracy in both tails, never overflowing: with e = e^{−|z|},
    σ(z) = 1/(1 + e) for z ≥ 0 and e/(1 + e) for z < 0.  Returns (σ, e, 1 + e)."""
    xp = backend.xp_of(z)
    e = xp.exp(-xp.abs(z))
    d = 1 + e
    return xp.where(z >= 0, 1 / d, e / d), e, d


class Sigmoid(Function):
    """y = σ(x) = 1/(1 + e⁻ˣ).   x̄ = ḡ ⊙ y(1 − y).   [ops.sigmoid]

    With e = e^{−|x|}: y = 1/(1 + e) for x ≥ 0, e/(1 + e) for x < 0, and
    y(1 − y) = e/(1 + e)². Neither overflows, and neither loses relative accuracy in a
    tail (½(1 + tanh(x/2)) returns σ(−30) with a 1.7·10⁻⁴ relative error; 1 − y is 0 for x ≳ 37).
    """

    def forward(self, x: Array) -> Array:
        y, self.e, _ = _stable_sigmoid(x)  # one saved array, as y alone would be
        return y

    def backward(self, g: Array) -> Any:
        d = 1 + self.e
        # σ'(x) = y(1 − y) = e/(1 + e)²
        return g * (self.e / (d * d))


class Relu(Function):
    """y = max(x, 0).   x̄ = ḡ ⊙ 1[x > 0] (0 at the kink, as PyTorch).   [ops.relu]"""

    def forward(self, x: Array) -> Array:
        self.mask = x > 0
        # where, not x·mask: −∞·0 would be NaN and −3·0 would give −0.0
        return backend.xp_of(x).where(self.mask, x, x.dtype.type(0))

    def backward(self, g: Array) -> Any:
        return g * self.mask


def _gelu_arrays(x: Array, need_grad: bool) -> tuple[Array, Array | None]:
    """(y, y') of the tanh-form GELU: the fused Numba kernel for NumPy float32/float64
    arrays (one pass for y and y' after NumPy's exp), the NumPy/CuPy reference otherwise
    (CuPy arrays, other dtypes, or ``NUMBA_DISABLE_JIT=1``, where the kernel's loops would run
    as Python). float64: the two agree bit for bit; float32: the kernel is the float64 value
    rounded once (minipeft/kernels/cpu/elementwise.py)."""
    from ..kernels.cpu import elementwise  # on first use: importing Numba takes ~0.6 s

    if _numba_ok(x):
        return elementwise.gelu_fused(x, need_grad)
    return elementwise.gelu_reference(x, need_grad)


class Gelu(Function):
    """GELU, tanh form (GPT-2's ``gelu_new``).   [ops.gelu]

    y = ½x(1 + t),  t = tanh(u),  u = c(x + k x³),  c = √(2/π), k = 0.044715
    x̄ = ḡ ⊙ [½(1 + t) + ½x(1 − t²)·c(1 + 3k x²)]

    Evaluated through s = ½(1 + t) = σ(2u), so that ½(1 − t²) = 2s(1 − s):
    y = x·s,  x̄ = ḡ ⊙ [s + 2x·s(1 − s)·u'].  The same function, but 1 + t cancels for
    x ≪ 0: relative error 2.8·10⁻¹⁰ at x = −5, 2.7·10⁻⁷ at −6, 100 % at −8 (0 returned);
    σ(2u) keeps ~10⁻¹⁵. x is clipped to ±20 inside u (σ(2u) is exactly 0 or 1 there).

    Forward computes y and y' = dy/dx together (``kernels.cpu.elementwise.gelu_fused``)
    and saves y' alone — one array, the size of x; backward is x̄ = ḡ ⊙ y'.
    """

    def forward(self, x: Array) -> Array:
        y, self.dydx = _gelu_arrays(x, need_grad=self.needs_input_grad[0])
        return y

    def backward(self, g: Array) -> Any:
        # x̄ = ḡ ⊙ y',  y' = s + 2x·s(1 − s)·du/dx  (computed in forward); y' is ours and
        # used once (the graph is freed after backward), so x̄ takes its place: no new array
        dydx = self.dydx
        dydx *= g
        return dydx


class Cast(Function):
    """y = x as another dtype.   x̄ = ḡ cast back.   [ops.astype]"""

    def forward(self, x: Array, dtype: Any) -> Array:
        self.src = x.dtype
        return x.astype(dtype)

    def backward(self, g: Array) -> Any:
        return g.astype(self.src)


def add(a: Any, b: Any) -> Tensor:
    """Elementwise a + b with broadcasting."""
    return _binary(Add, "add", a, b)


def sub(a: Any, b: Any) -> Tensor:
    """Elementwise a − b with broadcasting."""
    return _binary(Sub, "sub", a, b)


def mul(a: Any, b: Any) -> Tensor:
    """Elementwise a ⊙ b with broadcasting."""
    return _binary(Mul, "mul", a, b)


def div(a: Any, b: Any) -> Tensor:
    """Elementwise a / b with broadcasting."""
    return _binary(Div, "div", a, b)


def neg(x: Tensor) -> Tensor:
    """−x."""
    return Neg.apply(x)


def pow(x: Tensor, exponent: float) -> Tensor:
    """xᵖ for a constant real exponent p (use exp/log for a tensor exponent)."""
    if isinstance(exponent, Tensor) or not np.isscalar(exponent):
        raise TypeError(f"exponent: expected a real number, got {type(exponent).__name__}")
    return Pow.apply(x, p=float(exponent) if not float(exponent).is_integer() else int(exponent))


def exp(x: Tensor) -> Tensor:
    """eˣ."""
    return Exp.apply(x)


def log(x: Tensor) -> Tensor:
    """Natural logarithm."""
    return Log.apply(x)


def sqrt(x: Tensor) -> Tensor:
    """Square root."""
    return Sqrt.apply(x)


def tanh(x: Tensor) -> Tensor:
    """Hyperbolic tangent."""
    return Tanh.apply(x)


def sigmoid(x: Tensor) -> Tensor:
    """Logistic sigmoid."""
    return Sigmoid.apply(x)


def relu(x: Tensor) -> Tensor:
    """Rectified linear unit."""
    return Relu.apply(x)


def gelu(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2)."""
    return Gelu.apply(x)


def astype(x: Tensor, dtype: Any) -> Tensor:
    """Differentiable cast to a floating ``dtype``; a cast to an integer or boolean dtype
    gives a constant (no gradient flows through a rounding)."""
    x = as_tensor(x)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        return Tensor(x.data.astype(dtype))
    return Cast.apply(x, dtype=dtype)


# ---------------------------------------------------------------------------- matmul
class MatMul(Function):
    """Y = A·B over the last two axes, leading axes broadcast.   [ops.matmul]

    Ā = ḡ·Bᵀ,  B̄ = Aᵀ·ḡ  (each summed over the axes it was broadcast along).
    """

    def forward(self, a: Array, b: Array) -> Array:
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if self.needs_input_grad[0] else None
        self.sa, self.sb = a.shape, b.shape
        if a.ndim > 2 and b.ndim == 2:  # (..., k)·(k, n): one GEMM over all rows, not a batch
            return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])
        return a @ b

    def backward(self, g: Array) -> Any:
        ga = gb = None
        if len(self.sa) > 2 and len(self.sb) == 2:  # folded rows: Ā = ḡ·Bᵀ, B̄ = Σ Aᵀ·ḡ as GEMMs
            g2 = g.reshape(-1, g.shape[-1])  # (N, n)
            if self.needs_input_grad[0]:
                ga = (g2 @ self.b.swapaxes(-1, -2)).reshape(self.sa)  # (..., k)
            if self.needs_input_grad[1]:
                gb = self.a.reshape(-1, self.sa[-1]).swapaxes(-1, -2) @ g2  # (k, n)
            return ga, gb
        if self.needs_input_grad[0]:
            ga = unbroadcast(g @ self.b.swapaxes(-1, -2), self.sa)
        if self.needs_input_grad[1]:
            gb = unbroadcast(self.a.swapaxes(-1, -2) @ g, self.sb)
        return ga, gb


def matmul(a: Any, b: Any) -> Tensor:
    """Matrix product with NumPy semantics (1-D operands are promoted and squeezed)."""
    ta, tb = _float_peer(*_coerce_inputs((a, b)))
    _check_same_float("matmul", ta, tb)
    if ta.ndim == 0 or tb.ndim == 0:
        raise ValueError(f"matmul: operands must be at least 1-D, got {ta.shape} and {tb.shape}")
    shape_a, shape_b = ta.shape, tb.shape
    squeeze_a, squeeze_b = ta.ndim == 1, tb.ndim == 1
    if squeeze_a:
        ta = reshape(ta, (1, ta.shape[0]))
    if squeeze_b:
        tb = reshape(tb, (tb.shape[0], 1))
    if ta.shape[-1] != tb.shape[-2]:
        raise ValueError(
            f"matmul: inner dimensions differ: a has {ta.shape[-1]} columns, b has "
            f"{tb.shape[-2]} rows (a has shape {shape_a}, b has shape {shape_b})"
        )
    try:
        np.broadcast_shapes(ta.shape[:-2], tb.shape[:-2])
    except ValueError:
        raise ValueError(
            f"matmul: batch shapes {ta.shape[:-2]} of a and {tb.shape[:-2]} of b do not "
            f"broadcast (a has shape {shape_a}, b has shape {shape_b})"
        ) from None
    y = MatMul.apply(ta, tb)
    if squeeze_a:
        y = reshape(y, y.shape[:-2] + y.shape[-1:])
    if squeeze_b:
        y = reshape(y, y.shape[:-1])
    return y


# ---------------------------------------------------------------------------- reductions
class Sum(Function):
    """y = Σ_axes x.   x̄ = ḡ broadcast back over the reduced axes.   [ops.sum]"""

    def forward(self, x: Array, axis: Any, keepdims: Any) -> Array:
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, g: Array) -> Any:
        g = _expand_reduced(g, self.shape, self.axis, self.keepdims)
        return backend.xp_of(g).broadcast_to(g, self.shape)


class Max(Function):
    """y = max_axes x.   x̄ = ḡ ⊙ 1[x = y] / (number of ties).   [ops.max]

    Ties share the gradient equally (PyTorch's ``amax``), so the VJP is the same
    whichever maximal entry one would pick.
    """

    def forward(self, x: Array, axis: Any, keepdims: Any) -> Array:
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        y = x.max(axis=axis, keepdims=True)
        mask = (x == y).astype(x.dtype)  # in x's dtype: bool/int would promote to float64
        # w = 1[x = y] / (number of ties)
        self.w = mask / mask.sum(axis=axis, keepdims=True)
        return y if keepdims else y.reshape([n for i, n in enumerate(x.shape) if i not in axis])

    def backward(self, g: Array) -> Any:
        return _expand_reduced(g, self.shape, self.axis, self.keepdims) * self.w


class Var(Function):
    """y = Σ(x − μ)² / (n − ddof) over the axes.   x̄ = ḡ ⊙ 2(x − μ)/(n − ddof).   [ops.var]

    (The μ-dependence drops out because Σ(x − μ) = 0.)
    """

    def forward(self, x: Array, axis: Any, keepdims: Any, ddof: Any) -> Array:
        n = int(np.prod([x.shape[i] for i in axis])) if axis else 1
        if n - ddof <= 0:
            raise ValueError(f"ddof: {ddof} leaves no degrees of freedom for {n} elements")
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        self.centered = x - x.mean(axis=axis, keepdims=True)
        self.denom = n - ddof
        return (self.centered**2).sum(axis=axis, keepdims=keepdims) / self.denom

    def backward(self, g: Array) -> Any:
        g = _expand_reduced(g, self.shape, self.axis, self.keepdims)
        return g * (2.0 / self.denom) * self.centered


def sum(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Sum over ``axis`` (None: all axes)."""
    x = as_tensor(x)
    return Sum.apply(x, axis=_normalize_axis(axis, x.ndim), keepdims=keepdims)


def mean(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis``: the sum divided by the number of reduced elements."""
    x = as_tensor(x)
    axes = _normalize_axis(axis, x.ndim)
    n = int(np.prod([x.shape[i] for i in axes])) if axes else 1
    if n == 0:
        raise ValueError(f"x: mean over an empty axis of a tensor of shape {x.shape}")
    return Sum.apply(x, axis=axes, keepdims=keepdims) * (1.0 / n)


def max(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Maximum over ``axis``; ties share the gradient."""
    x = as_tensor(x)
    if x.size == 0:
        raise ValueError("x: max of an empty tensor")
    return Max.apply(x, axis=_normalize_axis(axis, x.ndim), keepdims=keepdims)


def var(x: Tensor, axis: Any = None, keepdims: bool = False, ddof: int = 0) -> Tensor:
    """Variance over ``axis`` with ``ddof`` (NumPy's convention; 0 = population)."""
    x = as_tensor(x)
    if not isinstance(ddof, int | np.integer) or ddof < 0:
        raise ValueError(f"ddof: expected a non-negative integer, got {ddof!r}")
    return Var.apply(x, axis=_normalize_axis(axis, x.ndim), keepdims=keepdims, ddof=int(ddof))


# ---------------------------------------------------------------------------- shape
class Reshape(Function):
    """y = x viewed with a new shape.   x̄ = ḡ reshaped back.   [ops.reshape]"""

    def forward(self, x: Array, shape: Any) -> Array:
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, g: Array) -> Any:
        return g.reshape(self.shape)


class Transpose(Function):
    """y = x with axes permuted by π.   x̄ = ḡ permuted by π⁻¹.   [ops.transpose]"""

    def forward(self, x: Array, axes: Any) -> Array:
        self.inverse = None if axes is None else tuple(np.argsort(axes))
        return x.transpose(axes)

    def backward(self, g: Array) -> Any:
        return g.transpose(self.inverse)


class GetItem(Function):
    """y = x[index] (basic or advanced).   x̄ = zeros, then x̄[index] += ḡ.   [ops.getitem]

    Repeated advanced indices accumulate (scatter-add), as the chain rule requires.
    """

    def forward(self, x: Array, index: Any) -> Array:
        self.shape, self.dtype, self.index = x.shape, x.dtype, index
        return x[index]

    def backward(self, g: Array) -> Any:
        out = backend.xp_of(g).zeros(self.shape, dtype=g.dtype)
        if _is_basic_index(self.index):
            out[self.index] = g  # a basic index selects every element at most once
        else:
            backend.scatter_add(out, self.index, g)
        return out


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, int | np.integer | slice) or i is None or i is Ellipsis for i in items)


class Concat(Function):
    """y = [x₁, x₂, …] along an axis.   x̄ᵢ = the matching slice of ḡ.   [ops.concat]"""

    def forward(self, *xs: Array, axis: Any) -> Array:
        self.axis = axis
        self.bounds = np.cumsum([0] + [x.shape[axis] for x in xs])
        return backend.xp_of(*xs).concatenate(xs, axis=axis)

    def backward(self, g: Array) -> Any:
        out = []
        for i, need in enumerate(self.needs_input_grad):
            if not need:
                out.append(None)
                continue
            sl = [slice(None)] * g.ndim
            sl[self.axis] = slice(int(self.bounds[i]), int(self.bounds[i + 1]))
            out.append(g[tuple(sl)])
        return tuple(out)


class Split(Function):
    """y₁, …, yₙ = consecutive pieces of x along an axis (views).   [ops.split]

    x̄ = [ḡ₁, …, ḡₙ] concatenated along the axis (derivations/kernels.md: the pieces
    partition x, so each element of x̄ is exactly one ḡᵢ entry; concat's transpose), zeros
    for a piece that no gradient reached. One Function with n outputs, so x̄ is built once:
    n getitem ops would each allocate a zero-filled x-sized array, and the engine add them.
    """

    def forward(self, x: Array, sizes: Any, axis: Any) -> tuple[Array, ...]:
        self.shape, self.axis = x.shape, axis
        self.bounds = np.cumsum((0, *sizes))  # piece i is [bounds[i], bounds[i+1])
        return tuple(x[self._piece(i)] for i in range(len(sizes)))

    def _piece(self, i: int) -> tuple[slice, ...]:
        sl = [slice(None)] * len(self.shape)
        sl[self.axis] = slice(int(self.bounds[i]), int(self.bounds[i + 1]))
        return tuple(sl)

    def backward(self, *gs: Array) -> Any:
        present = [g for g in gs if g is not None]
        xp = backend.xp_of(*present)
        if len(present) == len(gs):
            return xp.concatenate(gs, axis=self.axis)  # x̄ = [ḡ₁, …, ḡₙ]
        out = xp.empty(self.shape, dtype=present[0].dtype)
        for i, g in enumerate(gs):
            out[self._piece(i)] = 0 if g is None else g  # an unused piece passes no gradient
        return out


def split(x: Tensor, sizes: int | Sequence[int], axis: int = 0) -> tuple[Tensor, ...]:
    """Cut ``x`` along ``axis`` into pieces of the given lengths ``sizes`` (adding up to the
    axis length; ``torch.split`` with a list), or into ``sizes`` equal pieces when it is an
    int (``np.split``'s meaning; ``torch.split`` would read an int as a piece length).
    Returns a tuple of Tensors, views of x."""
    x = as_tensor(x)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: {axis} is out of range for a tensor with {x.ndim} dimensions")
    ax = axis % x.ndim
    n = x.shape[ax]
    if isinstance(sizes, int | np.integer):
        if sizes <= 0 or n % sizes:
            raise ValueError(f"sizes: cannot cut an axis of length {n} into {sizes} equal pieces")
        sizes = [n // int(sizes)] * int(sizes)
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 0 for s in sizes) or builtins.sum(sizes) != n:
        raise ValueError(
            f"sizes: expected non-negative piece lengths adding up to {n} (axis {axis} of "
            f"shape {x.shape}), got {sizes}"
        )
    return Split.apply(x, sizes=tuple(sizes), axis=ax)


def reshape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Reshape (one entry may be −1)."""
    x = as_tensor(x)
    shape = tuple(int(s) for s in shape)
    known = int(np.prod([s for s in shape if s != -1]))
    n_free = shape.count(-1)
    if n_free > 1 or any(s < -1 for s in shape):
        raise ValueError(f"shape: invalid target shape {shape}")
    if n_free == 1:
        if known == 0 or x.size % known:
            raise ValueError(f"shape: cannot reshape a tensor of shape {x.shape} to {shape}")
        shape = tuple(x.size // known if s == -1 else s for s in shape)
    elif known != x.size:
        raise ValueError(f"shape: cannot reshape a tensor of shape {x.shape} to {shape}")
    return Reshape.apply(x, shape=shape)


def transpose(x: Tensor, axes: Sequence[int] | None = None) -> Tensor:
    """Permute axes (None reverses them, as NumPy)."""
    x = as_tensor(x)
    if axes is not None:
        given = tuple(axes)
        if any(not -x.ndim <= int(a) < x.ndim for a in given):
            raise ValueError(f"axes: {given} is out of range for a tensor with {x.ndim} dimensions")
        axes = tuple(int(a) % x.ndim for a in given)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"axes: {given} is not a permutation of the {x.ndim} axes")
    return Transpose.apply(x, axes=axes)


def getitem(x: Tensor, index: Any) -> Tensor:
    """``x[index]``; Tensor indices are used by value (they get no gradient)."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    elif isinstance(index, list):
        index = backend.xp_of(data_of(x)).asarray(index)  # a literal list, built where x lives
    return GetItem.apply(x, index=index)


def concat(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Concatenate along an existing axis."""
    ts = _coerce_inputs(tuple(xs))
    if not ts:
        raise ValueError("xs: expected at least one tensor")
    nd = ts[0].ndim
    if nd == 0 or not -nd <= axis < nd:
        raise ValueError(f"axis: {axis} is out of range for tensors with {nd} dimensions")
    ax = axis % nd
    for i, t in enumerate(ts):
        if t.dtype != ts[0].dtype:
            raise TypeError(
                f"xs[{i}]: dtype {t.dtype} differs from xs[0]'s {ts[0].dtype} (cast with .astype)"
            )
        if (
            t.ndim != nd
            or t.shape[:ax] + t.shape[ax + 1 :] != ts[0].shape[:ax] + ts[0].shape[ax + 1 :]
        ):
            raise ValueError(
                f"xs[{i}]: shape {t.shape} does not match {ts[0].shape} outside axis {axis}"
            )
    return Concat.apply(*ts, axis=ax)


def stack(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Stack along a new axis (a reshape of each input, then a concat)."""
    ts = _coerce_inputs(tuple(xs))
    if not ts:
        raise ValueError("xs: expected at least one tensor")
    for i, t in enumerate(ts):
        if t.shape != ts[0].shape:
            raise ValueError(f"xs[{i}]: shape {t.shape} differs from xs[0]'s {ts[0].shape}")
    nd = ts[0].ndim + 1
    if not -nd <= axis < nd:
        raise ValueError(f"axis: {axis} is out of range for stacking {nd - 1}-D tensors")
    ax = axis % nd
    expanded = [reshape(t, (*t.shape[:ax], 1, *t.shape[ax:])) for t in ts]  # (..., 1, ...)
    return concat(expanded, axis=ax)


# ---------------------------------------------------------------------------- selection
class Where(Function):
    """y = cond ? a : b.   ā = ḡ ⊙ cond, b̄ = ḡ ⊙ ¬cond.   [ops.where]"""

    def forward(self, a: Array, b: Array, cond: Array) -> Array:
        self.cond, self.sa, self.sb = cond, a.shape, b.shape
        return backend.xp_of(a, b).where(cond, a, b)

    def backward(self, g: Array) -> Any:
        xp = backend.xp_of(g)
        zero = xp.zeros((), dtype=g.dtype)
        ga = (
            unbroadcast(xp.where(self.cond, g, zero), self.sa) if self.needs_input_grad[0] else None
        )
        gb = (
            unbroadcast(xp.where(self.cond, zero, g), self.sb) if self.needs_input_grad[1] else None
        )
        return ga, gb


def _as_bool_mask(name: str, cond: Any) -> Any:
    if isinstance(cond, Tensor):
        cond = cond.data
    xp = backend.xp_of(cond)
    cond = xp.asarray(cond)
    if cond.dtype != bool:
        raise TypeError(f"{name}: expected a boolean mask, got dtype {cond.dtype}")
    return cond


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Select from ``a`` where ``cond`` is true, else from ``b`` (all broadcast)."""
    cond = _as_bool_mask("cond", cond)
    ta, tb = _float_peer(*_coerce_inputs((a, b)))
    _check_same_float("where", ta, tb)
    try:
        np.broadcast_shapes(cond.shape, ta.shape, tb.shape)
    except ValueError:
        raise ValueError(
            f"where: cond {cond.shape}, a {ta.shape} and b {tb.shape} do not broadcast"
        ) from None
    return Where.apply(ta, tb, cond=cond)


def masked_fill(x: Tensor, mask: Any, value: float) -> Tensor:
    """``x`` with entries where ``mask`` is true replaced by the constant ``value``."""
    x = as_tensor(x)
    mask = _as_bool_mask("mask", mask)
    try:
        out_shape = np.broadcast_shapes(mask.shape, x.shape)
    except ValueError:
        raise ValueError(f"mask: shape {mask.shape} does not broadcast to x's {x.shape}") from None
    if out_shape != x.shape:
        raise ValueError(f"mask: shape {mask.shape} would enlarge x's shape {x.shape}")
    fill = backend.xp_of(x.data).asarray(value, dtype=x.dtype)
    return Where.apply(Tensor(fill), x, cond=mask)


# ---------------------------------------------------------------------------- embedding
class Embedding(Function):
    """y = W[ids] (row gather).   W̄ = zeros, then W̄[ids] += ḡ (scatter-add).   [ops.embedding]"""

    def forward(self, weight: Array, ids: Array) -> Array:
        self.shape, self.ids = weight.shape, ids
        return weight[ids]

    def backward(self, g: Array) -> Any:
        from ..kernels.cpu import elementwise as ew

        out = backend.xp_of(g).zeros(self.shape, dtype=g.dtype)
        ids, g2 = self.ids.reshape(-1), g.reshape(-1, self.shape[-1])  # (N,), (N, D)
        # W̄[ids] += ḡ row by row (Numba: np.add.at's sums bit for bit, ~50× faster)
        scatter = ew.scatter_add_rows if _numba_ok(g) else ew.scatter_add_rows_reference
        scatter(out, ids, g2)
        return out


def embedding(weight: Tensor, ids: Any, *, check_range: bool = True) -> Tensor:
    """Rows of ``weight`` (V, D) picked by integer ``ids`` of any shape → (*ids.shape, D).

    ``ids`` must live where ``weight`` does (a model moves its inputs once at its entry).
    ``check_range=False`` skips the range check for ids already validated (a model checks
    its inputs on the host before moving them; on the device the check would cost a
    device → host round trip per call).
    """
    if isinstance(ids, Tensor):
        ids = ids.data
    if backend.placement(ids) != backend.placement(weight.data) and getattr(ids, "ndim", 0):
        raise backend.PlacementError(
            f"ids: live on {backend.placement(ids)}, weight on "
            f"{backend.placement(weight.data)}; move the ids once with backend.to_device"
        )
    ids = backend.xp_of(weight.data).asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids: expected integer token ids, got dtype {ids.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected shape (vocab, dim), got {weight.shape}")
    if check_range:
        check_index_range(ids, weight.shape[0], "ids")
    return Embedding.apply(weight, ids=ids)


def check_index_range(ids: Array, high: int, name: str, ignore: int | None = None) -> None:
    """ValueError naming ``name`` unless every id (other than ``ignore``) lies in [0, high)."""
    kept = ids if ignore is None else ids[ids != ignore]
    if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= high):
        extra = "" if ignore is None else f" or equal ignore_index={ignore}"
        raise ValueError(
            f"{name}: values must lie in [0, {high}){extra}, got range "
            f"[{int(kept.min())}, {int(kept.max())}]"
        )


# ---------------------------------------------------------------------------- softmax family
class Softmax(Function):
    """y = softmax(x) along an axis, computed as e^{x−max x}/Σ e^{x−max x}.   [ops.softmax]

    x̄ = y ⊙ (ḡ − Σⱼ ḡⱼ yⱼ)  (the Jacobian diag(y) − y yᵀ applied to ḡ).
    """

    def forward(self, x: Array, axis: Any) -> Array:
        xp = backend.xp_of(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        self.y, self.axis = e / e.sum(axis=axis, keepdims=True), axis
        return self.y

    def backward(self, g: Array) -> Any:
        y = self.y
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """y = x − logsumexp(x) along an axis (shifted by max x for stability).   [ops.log_softmax]

    x̄ = ḡ − softmax(x) ⊙ Σⱼ ḡⱼ.
    """

    def forward(self, x: Array, axis: Any) -> Array:
        xp = backend.xp_of(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.y, self.axis = y, axis
        return y

    def backward(self, g: Array) -> Any:
        xp = backend.xp_of(g)
        return g - xp.exp(self.y) * g.sum(axis=self.axis, keepdims=True)


class CrossEntropy(Function):
    """L = mean over valid i of (logsumexp(zᵢ) − z_{i,tᵢ}).   [ops.cross_entropy]

    z̄ᵢ = ḡ · (softmax(zᵢ) − onehot(tᵢ)) / n_valid for valid rows, 0 for ignored rows.
    With every target ignored the mean is 0/0 = NaN, as in PyTorch.
    """

    def forward(self, logits: Array, targets: Array, ignore_index: Any) -> Array:
        xp = backend.xp_of(logits)
        c = logits.shape[-1]
        z = logits.reshape(-1, c)
        t = targets.reshape(-1)
        valid = t != ignore_index
        safe_t = xp.where(valid, t, 0)
        on_host = xp is np  # on the device, no decision may wait for a device → host copy
        if not on_host or not bool(valid.all()):
            # ignored rows take no part: zeroed, so even a row of −∞ cannot make a NaN
            z = xp.where(valid[:, None], z, 0)
        shifted = z - z.max(axis=1, keepdims=True)
        e = xp.exp(shifted)  # e^{z − max z}, each in (0, 1]
        se = e.sum(axis=1)  # Σⱼ e^{z_j − max z} ≥ 1
        lse = xp.log(se)  # logsumexp(z) − max z
        picked = xp.take_along_axis(shifted, safe_t[:, None], axis=1)[:, 0]
        n_valid = int(valid.sum()) if on_host else valid.sum()  # a 0-d device array there
        self.shape, self.valid, self.t, self.n = logits.shape, valid, safe_t, n_valid
        if self.needs_input_grad[0]:
            # softmax(z) = e / Σe, reusing e: one exp per logit, and e/Σe is the more
            # accurate form (exp(shifted − lse) turns the rounding of the subtraction into
            # a relative error |shifted|·u)
            e /= se[:, None]
            self.p = e
        losses = xp.where(valid, lse - picked, 0)
        if not on_host:  # 0/0 = NaN, as on the host, without asking the host
            mean = losses.sum() / xp.maximum(n_valid, 1)
            return xp.where(n_valid > 0, mean, xp.nan).astype(logits.dtype)
        with np.errstate(invalid="ignore", divide="ignore"):
            return xp.asarray(losses.sum() / n_valid if n_valid else np.nan, dtype=logits.dtype)

    def backward(self, g: Array) -> Any:
        xp = backend.xp_of(g)
        d = self.p  # ours and used once (the graph is freed after backward): z̄ takes its place
        d[xp.arange(d.shape[0]), self.t] -= 1
        n = builtins.max(self.n, 1) if xp is np else xp.maximum(self.n, 1)
        d *= self.valid[:, None] * (g / n)
        return d.reshape(self.shape)


def _single_axis(axis: Any, ndim: int) -> int:
    if not isinstance(axis, int | np.integer):
        raise TypeError(f"axis: expected one integer axis, got {axis!r}")
    return _normalize_axis(axis, ndim)[0]


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Numerically stable softmax along ``axis``."""
    x = as_tensor(x)
    return Softmax.apply(x, axis=_single_axis(axis, x.ndim))


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Numerically stable log-softmax along ``axis``."""
    x = as_tensor(x)
    return LogSoftmax.apply(x, axis=_single_axis(axis, x.ndim))


def cross_entropy(
    logits: Tensor, targets: Any, ignore_index: int = -100, *, check_range: bool = True
) -> Tensor:
    """Mean cross-entropy of ``logits`` (..., C) against integer ``targets`` (...).

    Targets equal to ``ignore_index`` contribute neither loss nor gradient. Host targets
    beside device logits are moved once; ``check_range=False`` skips the range check for
    targets a model has already validated on the host.
    """
    logits = as_tensor(logits)
    if isinstance(targets, Tensor):
        targets = targets.data
    xp = backend.xp_of(logits.data)
    targets = xp.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets: expected integer class ids, got dtype {targets.dtype}")
    if logits.ndim < 1 or tuple(targets.shape) != logits.shape[:-1]:
        raise ValueError(
            f"targets: expected shape {logits.shape[:-1]} (logits without the class axis), "
            f"got {tuple(targets.shape)}"
        )
    if check_range:
        check_index_range(targets, logits.shape[-1], "targets", ignore=ignore_index)
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)


# ---------------------------------------------------------------------------- layer norm
class LayerNorm(Function):
    """Layer normalization over the last axis, fused.   [ops.layer_norm]

    forward:  μ = mean(x),  σ² = mean((x − μ)²),  r = 1/√(σ² + ε),
              x̂ = (x − μ)·r,  y = x̂ ⊙ γ + β
    backward: γ̄ = Σ_rows ḡ ⊙ x̂,  β̄ = Σ_rows ḡ,  with ĝ = ḡ ⊙ γ:
              x̄ = r · (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂))

    NumPy float arrays go through Numba kernels that do each row in one pass in float64
    (``kernels.cpu.elementwise.layer_norm_fused``; as accurate as the NumPy reference in
    float64, more accurate in float32); saved: x̂ (x's size), r (one per row) and γ.
    """

    def forward(self, x: Array, weight: Array, bias: Array, eps: Any) -> Array:
        from ..kernels.cpu import elementwise as ew  # on first use (Numba loads in ~0.6 s)

        fused = _numba_ok(x) and weight.dtype == x.dtype
        fn = ew.layer_norm_fused if fused else ew.layer_norm_reference
        y, xhat, rstd = fn(x, weight, bias, eps)
        if any(self.needs_input_grad):
            self.xhat, self.rstd, self.weight, self.fused = xhat, rstd, weight, fused
        return y

    def backward(self, g: Array) -> Any:
        from ..kernels.cpu import elementwise as ew

        fused = self.fused and _numba_ok(g) and g.dtype == self.xhat.dtype
        fn = ew.layer_norm_backward_fused if fused else ew.layer_norm_backward_reference
        return fn(g, self.xhat, self.rstd, self.weight, self.needs_input_grad)


def _numba_ok(x: Array) -> bool:
    """Whether the Numba kernels apply: a NumPy float32/float64 array with the JIT on."""
    from ..kernels.cpu import elementwise

    return isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float64) and elementwise.JIT


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis with optional affine ``weight`` (γ) and ``bias`` (β)."""
    x = as_tensor(x)
    d = x.shape[-1] if x.ndim else 0
    xp = backend.xp_of(x.data)
    w = weight if weight is not None else Tensor(xp.ones(d, dtype=x.dtype))
    b = bias if bias is not None else Tensor(xp.zeros(d, dtype=x.dtype))
    for name, t in (("weight", w), ("bias", b)):
        if t.shape != (d,):
            raise ValueError(
                f"{name}: expected shape ({d},) for x of shape {x.shape}, got {t.shape}"
            )
        _check_same_float("layer_norm", x, t)
    if eps <= 0:
        raise ValueError(f"eps: expected a positive number, got {eps}")
    return LayerNorm.apply(x, w, b, eps=float(eps))


# ---------------------------------------------------------------------------- dropout
class Dropout(Function):
    """y = x ⊙ m / (1 − p), m ~ Bernoulli(1 − p).   x̄ = ḡ ⊙ m / (1 − p).   [ops.dropout]"""

    def forward(self, x: Array, p: Any, rng: Any) -> Array:
        xp = backend.xp_of(x)
        keep = rng.random(x.shape) >= p
        self.scale = xp.asarray(keep, dtype=x.dtype) * x.dtype.type(1.0 / (1.0 - p))
        return x * self.scale

    def backward(self, g: Array) -> Any:
        return g * self.scale


def dropout(x: Tensor, p: float, training: bool = True, rng: Any = None) -> Tensor:
    """Inverted dropout: zero each entry with probability ``p`` and rescale the rest.

    The mask is drawn where ``x`` lives: by default from ``backend.rng_like(x)`` (NumPy's
    seeded generator on the host, CuPy's seeded from the same seed on the device).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: dropout probability must lie in [0, 1], got {p}")
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    if rng is None:
        rng = backend.rng_like(x.data)  # drawn where x lives, reproducibly from seed()
    elif isinstance(rng, np.random.Generator) and backend.placement(x.data) == "cupy":
        raise backend.PlacementError(
            "rng: a NumPy generator would draw the mask on the host for a device tensor; "
            "pass None (minipeft's seeded device generator) or a cupy.random.Generator"
        )
    return Dropout.apply(x, p=float(p), rng=rng)
