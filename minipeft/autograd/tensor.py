"""Tensor, Function and reverse-mode accumulation — the whole engine in one page.

A ``Tensor`` holds an array (``data``), an optional gradient (``grad``, same shape) and
``requires_grad``. Every differentiable operation is a ``Function`` subclass with its
``forward`` and ``backward`` side by side (derivations/autograd.md, ``autograd.vjp``):

    forward(*arrays)  -> y
    backward(ḡ)       -> (ḡ·∂y/∂x₁, ḡ·∂y/∂x₂, ...)    one vector-Jacobian product per input

``Function.apply`` runs ``forward`` on the inputs' arrays and, when any input requires a
gradient and gradients are enabled, records the function on the output. ``backward``
walks the recorded graph in reverse topological order and accumulates ``grad += ...``
(a node used twice receives the sum of both contributions — the multivariate chain rule).

A Function may return several arrays (``split``): each becomes a Tensor recording the same
Function and its position ``_out``, and backward calls ``fn.backward(ḡ₁, …, ḡₙ)`` once, when
the last of those outputs has its gradient; an output that no gradient reached gives None.

Frozen weights are the point of PEFT: ``backward`` is told which inputs need a gradient
(``self.needs_input_grad``) and must return ``None`` for the others without computing
anything; the engine never allocates a ``grad`` for a tensor with ``requires_grad=False``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import array_api_compat
import numpy as np

from .. import backend

__all__ = [
    "Function",
    "Tensor",
    "as_tensor",
    "data_of",
    "input_array",
    "is_grad_enabled",
    "no_grad",
    "tensor",
]

_GRAD_ENABLED = True

#: minipeft.autograd.ops, bound once by the package's __init__ (ops imports this module, so
#: it cannot be imported here); the operators below call through it
_ops: Any = None


def _bind_ops(module: Any) -> None:
    global _ops
    _ops = module


def is_grad_enabled() -> bool:
    """Whether new operations are being recorded for backward."""
    return _GRAD_ENABLED


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run operations without recording them (inference, optimizer updates)."""
    global _GRAD_ENABLED
    old = _GRAD_ENABLED
    _GRAD_ENABLED = False
    try:
        yield
    finally:
        _GRAD_ENABLED = old


def _as_array(data: Any, dtype: Any = None) -> Any:
    """Array of ``data`` in its own namespace; Python floats take the default dtype."""
    if isinstance(data, Tensor):
        raise TypeError("data: expected an array or a number, got a Tensor (use .data)")
    xp = backend.xp_of(data)
    if xp is np and not isinstance(data, np.ndarray | np.generic):
        xp = backend.xp()  # Python numbers and lists are new data: the current backend
    arr = xp.asarray(data, dtype=dtype)
    if dtype is None and arr.dtype.kind in "fc" and not hasattr(data, "dtype"):
        # Python floats and lists take the default dtype; an array (NumPy or CuPy) keeps its
        # own, and Python ints/bools stay integer arrays (indices, masks)
        arr = arr.astype(backend.default_dtype(), copy=False)
    return arr


class Tensor:
    """An array with an optional gradient and a link to the Function that made it.

    A tensor lives where its array lives: ``Tensor(array)`` wraps a NumPy or CuPy array where
    it is (operations take their namespace from their inputs, never from a global), Python
    numbers and lists go to the current backend. ``minipeft.tensor(data)`` creates a tensor
    on the current backend (host data copied to the device under ``set_backend("cupy")``),
    and ``.to("numpy" | "cupy")`` copies one explicitly.
    """

    __slots__ = ("__weakref__", "_ctx", "_out", "data", "grad", "name", "requires_grad")
    __array_priority__ = 1000  # so ndarray + Tensor dispatches to Tensor.__radd__

    def __init__(
        self, data: Any, requires_grad: bool = False, dtype: Any = None, name: str | None = None
    ) -> None:
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(
                f"requires_grad: only floating tensors can require a gradient, "
                f"got dtype {self.data.dtype}"
            )
        self.requires_grad = bool(requires_grad)
        self.grad: Any = None
        self._ctx: Function | None = None
        self._out = 0  # which output of _ctx this tensor is
        self.name = name

    # ------------------------------------------------------------------ introspection
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        name = f", name={self.name!r}" if self.name else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag}{name})"

    def to(self, device: str) -> Tensor:
        """A copy of this tensor on ``device`` ("numpy": host, "cupy": device), cut from the
        graph (a transfer is not differentiated); ``requires_grad`` is kept. The same
        tensor when it already lives there."""
        if device not in ("numpy", "cupy"):
            raise ValueError(f"device: expected 'numpy' or 'cupy', got {device!r}")
        if self.placement() == device:
            return self
        out = _output(backend.to_device(self.data, device), None, 0)
        out.requires_grad, out.name = self.requires_grad, self.name
        return out

    def placement(self) -> str:
        """Where the data lives: ``"numpy"`` (host) or ``"cupy"`` (device)."""
        return backend.placement(self.data)

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the device under CuPy)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def astype(self, dtype: Any) -> Tensor:
        """A differentiable dtype cast."""
        return _ops.astype(self, dtype)

    def zero_grad(self) -> None:
        self.grad = None

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad: dtype {self.data.dtype} cannot require a gradient")
        self.requires_grad = bool(flag)
        return self

    # ------------------------------------------------------------------ backward
    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` that requires one.
        [autograd.backward]

        ``grad`` is the upstream gradient ḡ (defaults to 1 for a scalar; a host array for a
        device output is copied there once). The graph is
        walked in reverse topological order; each Function receives the sum of all
        gradients flowing into its output before it runs, so shared nodes are handled once.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require a gradient")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"grad: required for a non-scalar output of shape {self.shape}")
            grad = backend.xp_of(self.data).ones_like(self.data)
        else:
            # the cotangent is an input of this call: moved once to where the output lives
            grad = backend.like(grad.data if isinstance(grad, Tensor) else grad, self.data)
            grad = _as_array(grad, self.dtype)
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"grad: expected shape {self.shape}, got {tuple(grad.shape)}")

        order = _topological_order(self)
        grads: dict[int, Any] = {id(self): grad}
        # a Function runs once all of its outputs in this graph have their gradients
        waiting = Counter(id(node._ctx) for node in order if node._ctx is not None)
        out_grads: dict[int, list[Any]] = {}  # ḡ of each output, by Function
        for node in order:  # outputs before inputs
            g = grads.pop(id(node), None)
            fn = node._ctx
            if fn is None:  # a leaf: accumulate into .grad
                if g is None:
                    continue
                if node.grad is None:
                    node.grad = g.copy()  # g may be shared with other nodes
                else:
                    node.grad += g
                continue
            slots = out_grads.setdefault(id(fn), [None] * fn.n_outputs)
            slots[node._out] = g
            waiting[id(fn)] -= 1
            if waiting[id(fn)]:
                continue  # another output of fn comes later in the order
            del out_grads[id(fn)]
            if all(s is None for s in slots):
                continue
            in_grads = fn.backward(*slots)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            if len(in_grads) != len(fn.parents):
                raise RuntimeError(
                    f"{type(fn).__name__}.backward returned {len(in_grads)} gradients "
                    f"for {len(fn.parents)} inputs"
                )
            for parent, pg, needed in zip(fn.parents, in_grads, fn.needs_input_grad):
                if not needed:
                    continue
                if pg is None:
                    raise RuntimeError(f"{type(fn).__name__}.backward gave no gradient")
                if tuple(pg.shape) != parent.shape or pg.dtype != parent.dtype:
                    # a VJP must return x̄ with x's shape and dtype (catches broadcast and
                    # dtype-promotion bugs at the op that made them)
                    raise RuntimeError(
                        f"{type(fn).__name__}.backward returned a gradient of shape "
                        f"{tuple(pg.shape)} and dtype {pg.dtype} for an input of shape "
                        f"{parent.shape} and dtype {parent.dtype}"
                    )
                key = id(parent)
                if key in grads:
                    grads[key] = grads[key] + pg
                else:
                    grads[key] = pg
            fn.release()

    # ------------------------------------------------------------------ operators
    def __add__(self, other: Any) -> Tensor:
        return _ops.add(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return _ops.add(other, self)

    def __sub__(self, other: Any) -> Tensor:
        return _ops.sub(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return _ops.sub(other, self)

    def __mul__(self, other: Any) -> Tensor:
        return _ops.mul(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return _ops.mul(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return _ops.div(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return _ops.div(other, self)

    def __neg__(self) -> Tensor:
        return _ops.neg(self)

    def __pow__(self, exponent: float) -> Tensor:
        return _ops.pow(self, exponent)

    def __matmul__(self, other: Any) -> Tensor:
        return _ops.matmul(self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return _ops.matmul(other, self)

    def __getitem__(self, index: Any) -> Tensor:
        return _ops.getitem(self, index)

    # ------------------------------------------------------------------ methods
    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return _ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return _ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return _ops.max(self, axis=axis, keepdims=keepdims)

    def var(self, axis: Any = None, keepdims: bool = False, ddof: int = 0) -> Tensor:
        return _ops.var(self, axis=axis, keepdims=keepdims, ddof=ddof)

    def reshape(self, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return _ops.reshape(self, shape)

    def transpose(self, *axes: Any) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        return _ops.transpose(self, axes or None)

    def permute(self, *axes: int) -> Tensor:
        return self.transpose(*axes)

    @property
    def T(self) -> Tensor:
        return _ops.transpose(self, None)

    def exp(self) -> Tensor:
        return _ops.exp(self)

    def log(self) -> Tensor:
        return _ops.log(self)

    def sqrt(self) -> Tensor:
        return _ops.sqrt(self)

    def tanh(self) -> Tensor:
        return _ops.tanh(self)

    def relu(self) -> Tensor:
        return _ops.relu(self)

    def sigmoid(self) -> Tensor:
        return _ops.sigmoid(self)


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Create a Tensor on the current backend (floats default to the current default dtype).

    Host data (a NumPy array, a list, a number) given under ``set_backend("cupy")`` is
    copied to the device — as ``torch.tensor`` places data on the default device; a device
    array stays where it is. ``Tensor(array)`` instead wraps an array where it lives.
    """
    if isinstance(data, Tensor):
        raise TypeError("data: expected an array or a number, got a Tensor (use .data)")
    return Tensor(backend.to_device(data), requires_grad=requires_grad, dtype=dtype)


def data_of(x: Any) -> Any:
    """A Tensor's array, or ``x`` itself (an array, a list, a number). Never
    ``getattr(x, "data", x)``: a CuPy array has a ``data`` attribute of its own (its
    memory pointer)."""
    return x.data if isinstance(x, Tensor) else x


def input_array(a: Any) -> Any:
    """A model input (ids, labels, masks) as an array where it was given: a Tensor's data,
    a device array as is, anything else (lists, NumPy arrays) as a NumPy array. Models check
    it there and then move it once (``backend.like``): no device → host round trip for
    inputs given on the host."""
    a = data_of(a)
    return a if backend.placement(a) == "cupy" else np.asarray(a)


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """``x`` itself if it is a Tensor, else a constant Tensor.

    Beside a floating ``like``, a constant without a floating dtype of its own (a number,
    a list, an integer or boolean array) is cast to ``like.dtype``.
    """
    if isinstance(x, Tensor):
        return x
    if like is not None:
        _check_constant(x, like)
    if like is not None and like.dtype.kind == "f":
        # A constant beside a floating tensor takes that tensor's dtype when it carries no
        # floating dtype of its own (Python numbers and lists, NumPy scalars, integer or
        # boolean arrays): float32 + int64 would otherwise silently promote to float64.
        # A typed floating array keeps its dtype, so a float32/float64 mix still raises.
        typed_float = getattr(x, "ndim", 0) > 0 and getattr(x, "dtype", None) is not None
        typed_float = typed_float and np.dtype(x.dtype).kind == "f"
        if not typed_float:
            # straight to like's dtype: going through the default dtype first would round
            # a Python float to float32 beside a float64 tensor
            return Tensor(backend.xp_of(like.data).asarray(x, dtype=like.dtype))
    return Tensor(x)


def _check_constant(x: Any, like: Tensor) -> None:
    """A host array beside a device tensor would be copied to the device at every call:
    refuse it (numbers and lists are fine; they are kernel arguments)."""
    if getattr(x, "ndim", 0) > 0 and backend.placement(x) != backend.placement(like.data):
        raise backend.PlacementError(
            f"constant: a {backend.placement(x)} array of shape {tuple(x.shape)} beside a "
            f"tensor on {backend.placement(like.data)}; move it once with "
            f"minipeft.backend.to_device"
        )


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes reachable from ``root`` that require grad, outputs first (iterative DFS)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            if node._ctx.parents is None:  # released by an earlier backward
                raise RuntimeError(
                    "backward: this graph was already used by a backward pass (its saved "
                    "arrays were freed); run the forward again"
                )
            for parent in node._ctx.parents:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()
    return order


class Function:
    """One differentiable operation: ``forward`` and ``backward`` side by side.

    Subclasses implement ``forward(self, *arrays, **params)`` returning an array and
    ``backward(self, grad)`` returning one gradient (or ``None``) per array input; they
    save what backward needs on ``self`` and consult ``self.needs_input_grad``.
    ``backward`` must not modify ``grad`` in place (it may be shared).

    A forward that returns a tuple of n arrays makes n output Tensors; its backward then
    takes n upstream gradients, ``backward(self, g1, ..., gn)``, None for an output that
    no gradient reached (not used by the loss).
    """

    parents: tuple[Tensor, ...] = ()
    needs_input_grad: tuple[bool, ...] = ()
    n_outputs: int = 1

    @classmethod
    def apply(cls, *inputs: Any, **params: Any) -> Any:
        """The output Tensor, or a tuple of them when forward returns a tuple."""
        tensors = _coerce_inputs(inputs)
        fn = cls()
        # Under no_grad nothing needs a gradient, so forward saves nothing for backward.
        fn.needs_input_grad = tuple(_GRAD_ENABLED and t.requires_grad for t in tensors)
        out = fn.forward(*(t.data for t in tensors), **params)
        several = isinstance(out, tuple)
        outs = out if several else (out,)
        record = any(fn.needs_input_grad)
        if record:
            fn.parents = tensors
            fn.n_outputs = len(outs)
        results = tuple(_output(o, fn if record else None, i) for i, o in enumerate(outs))
        return results if several else results[0]

    def forward(self, *arrays: Any, **params: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} defines no forward")

    def backward(self, *grads: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} defines no backward")

    def release(self) -> None:
        """Drop saved arrays once backward has run (graphs are used once)."""
        self.__dict__.clear()
        self.parents = None  # type: ignore[assignment]


def _output(data: Any, fn: Function | None, index: int) -> Tensor:
    """Output ``index`` of ``fn`` (None: not recorded) as a Tensor around ``data``."""
    if isinstance(data, np.generic):  # NumPy reductions return scalars; keep arrays
        data = np.asarray(data)
    result = Tensor.__new__(Tensor)
    result.data = data
    result.grad = None
    result.name = None
    result.requires_grad = fn is not None
    result._ctx = fn
    result._out = index
    return result


def _coerce_inputs(inputs: Sequence[Any]) -> tuple[Tensor, ...]:
    """Tensors as they are; numbers and arrays become constants (dtype of a Tensor peer)."""
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    tensors = tuple(as_tensor(x, like) for x in inputs)
    if len(tensors) > 1:
        on_device = [array_api_compat.is_cupy_array(t.data) for t in tensors]
        if any(on_device) and not all(on_device):
            _placement_error(tensors, on_device)
    return tensors


def _placement_error(tensors: Sequence[Tensor], on_device: list[bool]) -> None:
    """Name the inputs on each side: mixing host and device arrays is a mistake to fix."""

    def describe(t: Tensor) -> str:
        return f"{t.name or 'a tensor'} of shape {t.shape}"

    host = next(t for t, d in zip(tensors, on_device) if not d)
    device = next(t for t, d in zip(tensors, on_device) if d)
    raise backend.PlacementError(
        f"inputs: {describe(host)} lives on numpy (host) and {describe(device)} on cupy "
        f"(device); move the model or the data with .to('cupy') / .to('numpy')"
    )
