"""ops.split and the engine's multi-output Functions: values, VJPs against float64 central
differences, unused pieces, frozen inputs, no_grad, errors, and GPT-2's q/k/v pattern."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_arrays, shapes

from minipeft.autograd import Function, Tensor, gradcheck, no_grad, ops


@st.composite
def split_case(draw):
    shape = draw(shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=0, max_size=3)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]  # may hold zero-length pieces
    x = draw(float_arrays(shape))
    used = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    return x, sizes, axis, used


@given(split_case())
def test_split_pieces_equal_numpy_and_are_views(case):
    x, sizes, axis, _ = case
    pieces = ops.split(Tensor(x), sizes, axis=axis)
    expected = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    assert len(pieces) == len(expected)
    for p, e in zip(pieces, expected):
        np.testing.assert_array_equal(p.data, e)
        assert p.data.size == 0 or np.shares_memory(p.data, x)


@given(split_case())
def test_split_vjp_matches_central_differences_with_unused_pieces(case):
    """L = Σᵢ used_i ⟨wᵢ, yᵢ²⟩: pieces the loss ignores must give exact zeros in x̄."""
    x, sizes, axis, used = case
    if not any(used):
        used = [True] * len(used)
    weights = [np.linspace(0.5, 1.5, max(s, 1)) for s in sizes]

    def f(t):
        pieces = ops.split(t, sizes, axis=axis)
        total = None
        for p, u, w in zip(pieces, used, weights):
            if u and p.size:
                shape = [1] * p.ndim
                shape[axis] = -1
                term = (p * p * w[: p.shape[axis]].reshape(shape)).sum()
                total = term if total is None else total + term
        return total if total is not None else (t * 0.0).sum()

    # central differences carry a rounding error ~u·|L|/ε ≈ 10⁻⁸ (|L| up to ~10²), judged
    # against gradcheck's floor 10⁻³·max|∇L| for tiny entries: up to a few 10⁻⁶
    assert gradcheck(f, [x]).max_rel_error < 1e-5
    t = Tensor(x, requires_grad=True)
    f(t).backward()
    for piece, u in zip(np.split(t.grad, np.cumsum(sizes)[:-1], axis=axis), used):
        if not u:
            assert not piece.any()  # an unused piece passes exactly zero


def test_qkv_pattern_equals_getitem_composition():
    """GPT-2's q/k/v: split + reshape + transpose gives the same values and x̄ as the former
    reshape/transpose/getitem composition (each getitem zero-filling a full-size array)."""
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 5, 3, 4
    c = h * d
    x = rng.standard_normal((b, t, 3 * c))
    g = [rng.standard_normal((b, h, t, d)) for _ in range(3)]

    def via_split(z):
        q, k, v = ops.split(z, 3, axis=-1)  # each (B, T, C)
        return [ops.transpose(ops.reshape(p, (b, t, h, d)), (0, 2, 1, 3)) for p in (q, k, v)]

    def via_getitem(z):
        z = ops.transpose(ops.reshape(z, (b, t, 3, h, d)), (2, 0, 3, 1, 4))  # (3, B, H, T, d)
        return [z[0], z[1], z[2]]

    grads = []
    for fn in (via_split, via_getitem):
        tx = Tensor(x, requires_grad=True)
        outs = fn(tx)
        loss = sum(((o * gi).sum() for o, gi in zip(outs, g)), Tensor(np.zeros(())))
        loss.backward()
        grads.append((tx.grad, [o.data for o in outs]))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    for a, e in zip(grads[0][1], grads[1][1]):
        np.testing.assert_array_equal(a, e)


def test_one_piece_alone_gets_zeros_elsewhere():
    x = Tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    _a, b = ops.split(x, [1, 3], axis=1)
    b.sum().backward()  # a is not in the graph at all
    np.testing.assert_array_equal(x.grad, [[0, 1, 1, 1]] * 3)


def test_pieces_used_twice_and_beside_the_input_accumulate():
    """x feeds the split and the loss directly; a piece is used twice."""
    x = Tensor(np.array([1.0, 2.0, 3.0, 4.0]), requires_grad=True)
    a, b = ops.split(x, 2)
    loss = (a * a).sum() + (a * 3.0).sum() + (b * x[2:]).sum() + x.sum()
    loss.backward()
    # ∂/∂x: a: 2a + 3 + 1;  b: x[2:] (as b) + b (as x[2:]) + 1
    np.testing.assert_array_equal(x.grad, [6.0, 8.0, 7.0, 9.0])


def test_split_of_a_frozen_input_records_nothing():
    x = Tensor(np.ones((2, 4)))
    pieces = ops.split(x, 2, axis=1)
    assert all(p._ctx is None and not p.requires_grad for p in pieces)
    with no_grad():
        pieces = ops.split(Tensor(np.ones(4), requires_grad=True), 2)
    assert all(p._ctx is None and not p.requires_grad for p in pieces)


def test_split_keeps_float32():
    x = Tensor(np.ones((2, 6), dtype=np.float32), requires_grad=True)
    q, _k, v = ops.split(x, 3, axis=1)
    (q.sum() + v.sum()).backward()
    assert x.grad.dtype == np.float32 and q.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [[1, 1, 0, 0, 1, 1]] * 2)


@pytest.mark.parametrize(
    ("sizes", "axis", "name"),
    [(5, 0, "sizes"), ([2, 2], 0, "sizes"), ([3, -1, 3], 0, "sizes"), (0, 0, "sizes"),
     (2, 2, "axis"), (2, -3, "axis")],
)  # fmt: skip
def test_split_errors_name_the_argument(sizes, axis, name):
    with pytest.raises(ValueError, match=name):
        ops.split(Tensor(np.ones((6, 2))), sizes, axis=axis)


def test_a_function_with_several_outputs_runs_its_backward_once():
    """The engine calls a multi-output backward once, with None for an unreached output."""
    calls = []

    class TwoOut(Function):
        def forward(self, x):
            return 2 * x, 3 * x

        def backward(self, g1, g2):
            calls.append((g1 is None, g2 is None))
            return (0 if g1 is None else 2 * g1) + (0 if g2 is None else 3 * g2)

    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    y1, y2 = TwoOut.apply(x)
    (y1 * y2).sum().backward()  # d/dx (6x²) = 12x
    np.testing.assert_array_equal(x.grad, [12.0, -24.0])
    assert calls == [(False, False)]
    x.grad = None
    y1, y2 = TwoOut.apply(x)
    (y2 + y2).sum().backward()  # y1 never reached: 2·3
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])
    assert calls[-1] == (True, False)
