"""The engine: reverse-mode accumulation, frozen inputs, no_grad, errors, and gradcheck itself."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from minipeft.autograd import Function, Tensor, gradcheck, no_grad, ops
from minipeft.autograd.gradcheck import numerical_grad, rel_error


class CountingArray(np.ndarray):
    """An ndarray that counts the matrix products it takes part in (views inherit it)."""

    matmuls: ClassVar[list[int]] = [0]  # shared by every view of one instrumented array

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            CountingArray.matmuls[0] += 1
        args = [np.asarray(a) if isinstance(a, CountingArray) else a for a in inputs]
        return getattr(ufunc, method)(*args, **kwargs)


def _counted(t: Tensor) -> Tensor:
    t.data = t.data.view(CountingArray)
    CountingArray.matmuls[0] = 0
    return t


# ---------------------------------------------------------------------------- frozen weights
@pytest.mark.parametrize("w_trainable", [False, True])
def test_frozen_weight_gradient_matmul_is_never_evaluated(w_trainable):
    """y = x·Wᵀ with x requiring grad: W̄ = ḡᵀx needs x, x̄ = ḡ·W does not.

    x counts every matmul it enters: one in forward; in backward one more only when W
    is trainable. A frozen W costs no matmul and gets no buffer."""
    rng = np.random.default_rng(0)
    x = _counted(Tensor(rng.standard_normal((5, 4)), requires_grad=True))
    w = Tensor(rng.standard_normal((3, 4)), requires_grad=w_trainable)
    y = ops.matmul(x, w.T)
    assert CountingArray.matmuls[0] == 1  # the forward product
    y.backward(np.ones((5, 3)))
    assert CountingArray.matmuls[0] == (2 if w_trainable else 1)
    assert (w.grad is not None) == w_trainable
    np.testing.assert_allclose(x.grad, np.ones((5, 3)) @ w.data)  # x̄ = ḡ·W


def test_lora_shaped_graph_trains_only_the_adapter():
    """h = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ with W₀ frozen: A and B get the right gradients, W₀ none."""
    rng = np.random.default_rng(1)
    x, w0 = rng.standard_normal((6, 5)), rng.standard_normal((4, 5))
    a, b = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))

    def f(x, w0, a, b):
        return (ops.matmul(x, w0.T) + 0.5 * ops.matmul(ops.matmul(x, a.T), b.T)).tanh()

    assert gradcheck(f, [x, w0, a, b], wrt=[2, 3]).max_rel_error < 1e-7
    tx, tw = Tensor(x), Tensor(w0)
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    f(tx, tw, ta, tb).sum().backward()
    assert tw.grad is None and tx.grad is None
    assert ta.grad.shape == a.shape and tb.grad.shape == b.shape


def test_function_is_told_which_inputs_need_a_gradient():
    seen = []

    class Spy(Function):
        def forward(self, a, b):
            seen.append(self.needs_input_grad)
            return a * b

        def backward(self, g):
            return (None if not self.needs_input_grad[0] else g, None)

    x, w = Tensor(np.ones(2), requires_grad=True), Tensor(np.ones(2))
    Spy.apply(x, w).sum().backward()
    assert seen == [(True, False)]
    with no_grad():
        Spy.apply(x, w)
    assert seen[-1] == (False, False)  # under no_grad nothing needs a gradient


# ---------------------------------------------------------------------------- accumulation
def test_a_node_used_twice_receives_the_sum_of_both_contributions():
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (x * x).sum().backward()  # d(x²)/dx = 2x, through both operands of one Mul
    np.testing.assert_array_equal(x.grad, [2.0, -4.0, 6.0])
    x.zero_grad()
    a = x * 3.0  # a diamond: a feeds two branches that meet again
    (a + a.exp()).sum().backward()  # d/dx = 3 + 3e^{3x}
    np.testing.assert_allclose(x.grad, 3 + 3 * np.exp(3 * x.data), rtol=1e-15)


def test_two_backward_calls_accumulate_into_a_leaf():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 5.0).sum().backward()  # a fresh graph: grad += 5
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])
    x.zero_grad()
    assert x.grad is None


def test_backward_through_a_used_graph_raises_clearly():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already used by a backward pass"):
        y.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])  # the failed call added nothing
    z = x * 3.0
    z.sum().backward()
    with pytest.raises(RuntimeError, match="already used"):
        (z * 2.0).sum().backward()  # z's own graph was released


def test_no_grad_records_nothing_and_restores_recording():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        y = (x * 2.0).exp()
        with no_grad():
            pass
        z = y + 1.0  # still inside the outer block
    assert y._ctx is None and not y.requires_grad and z._ctx is None
    w = x * 2.0
    assert w.requires_grad and w._ctx is not None  # recording is back on


def test_deep_chains_do_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y + 1.0
    y.backward()
    assert x.grad == 1.0


# ---------------------------------------------------------------------------- errors
def test_mixed_float_dtypes_raise_and_name_both():
    a32 = Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    a64 = Tensor(np.ones((2, 2)))
    for call in (
        lambda: a32 + a64,
        lambda: ops.matmul(a32, a64),
        lambda: ops.where(np.ones((2, 2), bool), a32, a64),
        lambda: ops.concat([a32, a64]),
        lambda: ops.layer_norm(a32, Tensor(np.ones(2)), None),
    ):
        with pytest.raises(TypeError, match=r"float32|float64"):
            call()


def test_constants_take_the_floating_peer_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    for y in (x + 1, x * np.array([1, 2, 3]), x / 3.0, 2**0 * x, ops.add(x, [1.0, 2.0, 3.0])):
        assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: ops.matmul(np.ones((2, 3)), np.ones((4, 5))), ["a has", "b has", "(2, 3)"]),
        (lambda: ops.matmul(np.ones((2, 2, 3)), np.ones((3, 3, 1))), ["batch shapes"]),
        (lambda: ops.add(Tensor(np.ones(3)), Tensor(np.ones(4))), ["(3,)", "(4,)"]),
        (lambda: ops.reshape(Tensor(np.ones(6)), (4, 2)), ["shape:"]),
        (lambda: ops.sum(Tensor(np.ones(3)), axis=1), ["axis:"]),
        (lambda: ops.transpose(Tensor(np.ones((2, 3))), (0, 0)), ["axes:"]),
        (lambda: ops.concat([Tensor(np.ones((2, 3))), Tensor(np.ones((2, 4)))]), ["xs[1]"]),
        (lambda: ops.embedding(Tensor(np.ones((3, 2))), np.array([3])), ["ids:"]),
        (lambda: ops.cross_entropy(Tensor(np.ones((2, 3))), np.zeros(3, int)), ["targets:"]),
        (lambda: ops.layer_norm(Tensor(np.ones((2, 3))), Tensor(np.ones(4)), None), ["weight:"]),
        (lambda: ops.masked_fill(Tensor(np.ones(3)), np.ones((2, 3), bool), 0.0), ["mask:"]),
        (lambda: ops.var(Tensor(np.ones(1)), ddof=1), ["ddof:"]),
        (lambda: Tensor(np.ones(3), requires_grad=True).backward(), ["grad:"]),
        (lambda: Tensor(np.ones(3), requires_grad=True).backward(np.ones(2)), ["grad:"]),
    ],
)
def test_shape_errors_name_the_argument(call, names):
    with pytest.raises(ValueError) as info:
        call()
    for name in names:
        assert name in str(info.value), str(info.value)


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="requires_grad"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(TypeError, match="ids"):
        ops.embedding(Tensor(np.ones((3, 2))), np.array([0.5]))
    with pytest.raises(TypeError, match="cond"):
        ops.where(np.ones(2), Tensor(np.ones(2)), 0.0)
    with pytest.raises(TypeError, match="exponent"):
        ops.pow(Tensor(np.ones(2)), Tensor(np.ones(2)))


def test_a_vjp_of_the_wrong_shape_is_caught_at_its_op():
    class Broken(Function):
        def forward(self, x):
            return x.sum()

        def backward(self, g):
            return g  # forgot to broadcast back to x's shape

    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Broken\.backward returned a gradient of shape \(\)"):
        Broken.apply(x).backward()


# ---------------------------------------------------------------------------- gradcheck
class Square(Function):
    """y = x², with a VJP that can be made wrong on purpose."""

    factor = 2.0

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, g):
        return g * self.factor * self.x


@pytest.mark.parametrize("size", [5, 2000])  # full (every entry) and directional mode
def test_gradcheck_catches_a_wrong_vjp(size, monkeypatch):
    x = np.random.default_rng(2).uniform(0.5, 1.5, size)

    def f(t):
        return Square.apply(t)  # gradcheck contracts with a fixed random cotangent

    right = gradcheck(f, [x])
    assert right.mode == ("full" if size <= 512 else "directional")
    assert right.max_rel_error < 1e-8, right
    monkeypatch.setattr(Square, "factor", 1.0)  # the classic bug: d(x²)/dx = x
    assert gradcheck(f, [x]).max_rel_error > 0.3
    monkeypatch.setattr(Square, "factor", 2.0 * (1 + 1e-5))  # a bug of one part in 10⁵
    assert gradcheck(f, [x]).max_rel_error > 5e-6


def test_gradcheck_catches_a_vjp_missing_its_broadcast_sum(monkeypatch):
    def bad_unbroadcast(grad, shape):
        return grad.reshape(-1)[: int(np.prod(shape))].reshape(shape)  # takes, never sums

    monkeypatch.setattr(ops, "unbroadcast", bad_unbroadcast)
    a, b = np.random.default_rng(3).standard_normal((2, 4, 3))
    with pytest.raises(AssertionError):
        assert gradcheck(lambda a, b: a * b, [a, b[:1]]).max_rel_error < 1e-6


def test_numerical_grad_of_a_known_function():
    x = np.array([0.3, -1.2, 2.0])
    g = numerical_grad(lambda t: (t * t * t).sum(), [x], 0)
    assert rel_error(g, 3 * x * x) < 1e-9  # truncation ε²·f'''/6 = 1e-12, rounding ~1e-10
    gw = numerical_grad(lambda t: t * t, [x], 0, weights=np.array([1.0, 2.0, 3.0]))
    assert rel_error(gw, np.array([1.0, 2.0, 3.0]) * 2 * x) < 1e-9


def test_gradcheck_fails_on_a_nan_gradient_wherever_it_is():
    """A NaN in any analytic gradient makes the result NaN (Python's max would skip it or
    not depending on its position), so every ``error < tol`` fails."""
    import math

    from minipeft.autograd import Function, gradcheck

    class NanOn(Function):  # identity whose VJP is NaN for input ``which``
        def forward(self, a, b, which):
            self.which = which
            return a + b

        def backward(self, g):
            bad = g * math.nan
            return (bad, g) if self.which == 0 else (g, bad)

    for which in (0, 1):
        for size in (3, 600):  # full and directional modes
            res = gradcheck(
                lambda a, b, w=which: NanOn.apply(a, b, which=w), [np.ones(size), np.ones(size)]
            )
            assert math.isnan(res.max_rel_error), (which, size, res)
            assert not res.max_rel_error < 1.0
