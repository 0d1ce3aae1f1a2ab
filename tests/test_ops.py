"""Every op, three properties, one table.

Each row of ``OPS`` names an op and gives
  * ``ref``     — a NumPy (or SciPy) reference forward, written independently of minipeft;
  * ``impl``    — the minipeft call;
  * ``inputs``  — a hypothesis strategy drawing a ``Case``: the differentiable float64
                  inputs (often in a non-contiguous layout) and the op's other arguments;
  * ``kink``    — how inputs are kept off points where the op is not differentiable
                  (applied to the drawn inputs before anything is computed).

and drives three property tests, each run on every backend of ``device.BACKENDS`` (NumPy,
the strict CuPy stand-in, and real CuPy where a GPU is present; on a device the inputs
and array arguments are moved there first, and every output and gradient must stay there):
  1. forward equals the reference (float64 and float32, and the dtype is preserved);
  2. the backward VJP equals central differences in float64 (``gradcheck``), and the
     analytic gradient does not depend on the memory layout of the inputs;
  3. frozen inputs: with one input not requiring grad, it gets no ``.grad``, every
     Function in the graph returns ``None`` for it, the others get the same gradient;
     under ``no_grad`` nothing is recorded.
A new op is tested by adding a row. Dropout and the special cases (ties in max,
ignore_index, logits of magnitude 1e4, GELU vs its closed form) follow the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import scipy.special as sps
from device import BACKENDS, host, on_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    broadcastable_shapes,
    distinct,
    float_arrays,
    layouts,
    noncontiguous_arrays,
    off_kinks,
    shapes,
    with_layout,
)

from minipeft import backend
from minipeft.autograd import Function, Tensor, gradcheck, no_grad, ops

# Max relative error of the VJP against float64 central differences. The registered checks
# (fixed inputs) hold 1e-6; random shapes and values also meet entries 10³ below the
# gradient's largest, where the FD rounding noise u·|L|/ε ≈ 1e-10·|L| reads larger: the worst
# over 100 examples per op was 5.4e-7 (cross_entropy). A wrong VJP reads ≥ 1e-5, usually ~1.
GRAD_TOL = 5e-6
MAX_EXAMPLES = max(12, settings.default.max_examples // 4)  # 12 by default, 100 if thorough


@dataclass
class Case:
    """Inputs of one example: differentiable float arrays and the op's other arguments."""

    arrays: list[np.ndarray]
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpCase:
    name: str
    ref: Callable[..., np.ndarray]
    impl: Callable[..., Tensor]
    inputs: st.SearchStrategy
    kink: Callable[[Case], Case] = lambda c: c


# ---------------------------------------------------------------------------- strategies
@st.composite
def unary(draw, lo: float = -3.0, hi: float = 3.0, min_dims: int = 0, **kw_strats):
    shape = draw(shapes(min_dims=min_dims))
    x = draw(noncontiguous_arrays(shape, lo, hi))
    return Case([x], {k: draw(s) for k, s in kw_strats.items()})


@st.composite
def binary(draw, lo_b: float = -3.0, hi_b: float = 3.0, b_away_from_zero: bool = False):
    sa, sb = draw(broadcastable_shapes(2))
    a = draw(noncontiguous_arrays(sa))
    b = draw(noncontiguous_arrays(sb, lo_b, hi_b))
    if b_away_from_zero:  # |b| in [0.5, 3]: a / b stays well conditioned
        b = np.where(b >= 0, 0.5 + np.abs(b), -0.5 - np.abs(b))
    return Case([a, b])


@st.composite
def pow_case(draw):
    p = draw(st.sampled_from([0, 1, 2, 3, -1, 0.5, 1.5, -2.5]))
    integer = float(p).is_integer() and p >= 0
    lo, hi = (-2.0, 2.0) if integer else (0.3, 2.0)  # real powers of negatives are NaN
    return Case(draw(unary(lo, hi)).arrays, {"p": p})


@st.composite
def matmul_case(draw):
    kind = draw(st.sampled_from(["vv", "vm", "mv", "batched"]))
    m, k, n = (draw(st.integers(1, 4)) for _ in range(3))
    if kind == "vv":
        sa, sb = (k,), (k,)
    elif kind == "vm":
        batch = draw(shapes(0, 2, max_side=3))
        sa, sb = (k,), (*batch, k, n)
    elif kind == "mv":
        batch = draw(shapes(0, 2, max_side=3))
        sa, sb = (*batch, m, k), (k,)
    else:
        ba, bb = draw(broadcastable_shapes(2, max_dims=2, max_side=3))
        sa, sb = (*ba, m, k), (*bb, k, n)
    return Case([draw(noncontiguous_arrays(sa)), draw(noncontiguous_arrays(sb))])


@st.composite
def reduce_case(draw, ddof: bool = False):
    shape = draw(shapes(min_dims=1))
    x = draw(noncontiguous_arrays(shape))
    nd = len(shape)
    axis = draw(
        st.one_of(
            st.none(),
            st.integers(-nd, nd - 1),
            st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple),
        )
    )
    kw = {"axis": axis, "keepdims": draw(st.booleans())}
    if ddof:
        axes = range(nd) if axis is None else ([axis] if isinstance(axis, int) else axis)
        n = math.prod(shape[a] for a in axes)
        kw["ddof"] = draw(st.integers(0, 1)) if n > 1 else 0
    return Case([x], kw)


@st.composite
def reshape_case(draw):
    shape = draw(shapes(min_dims=1))
    size = math.prod(shape)
    target = draw(
        st.sampled_from([(-1,), (size, 1), (1, *shape), tuple(reversed(shape)), (shape[0], -1)])
    )
    return Case([draw(noncontiguous_arrays(shape))], {"shape": target})


@st.composite
def transpose_case(draw):
    shape = draw(shapes(min_dims=1))
    axes = draw(st.one_of(st.none(), st.permutations(range(len(shape))).map(tuple)))
    return Case([draw(noncontiguous_arrays(shape))], {"axes": axes})


@st.composite
def getitem_case(draw):
    shape = draw(shapes(min_dims=1))
    x = draw(noncontiguous_arrays(shape))
    n0 = shape[0]
    kind = draw(st.sampled_from(["int", "slices", "ellipsis", "ints", "ints2", "mask", "mixed"]))
    if kind == "int":
        index: Any = draw(st.integers(-n0, n0 - 1))
    elif kind == "slices":
        index = tuple(
            slice(
                draw(st.integers(-n, n)),
                draw(st.integers(-n, n)),
                draw(st.sampled_from([1, 2, -1])),
            )
            for n in shape
        )
    elif kind == "ellipsis":
        index = (Ellipsis, None, slice(None, None, -1))
    elif kind == "ints":  # advanced, with repeated indices
        index = np.array(draw(st.lists(st.integers(-n0, n0 - 1), min_size=1, max_size=6)))
    elif kind == "ints2" and len(shape) >= 2:
        idx = st.lists(st.integers(0, 10**6), min_size=3, max_size=3)
        index = (np.array(draw(idx)) % shape[0], np.array(draw(idx)) % shape[1])
    elif kind == "mask":
        index = np.array(draw(st.lists(st.booleans(), min_size=n0, max_size=n0)))
    else:  # basic slice then an advanced index on the last axis, with repeats
        last = shape[-1]
        ids = np.array(draw(st.lists(st.integers(0, last - 1), min_size=1, max_size=5)))
        index = (Ellipsis, ids)
    return Case([x], {"index": index})


@st.composite
def embedding_case(draw):
    v, d = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    ids_shape = draw(shapes(1, 2, max_side=5))
    ids = draw(hnp_ints(ids_shape, v))
    return Case([draw(noncontiguous_arrays((v, d)))], {"ids": ids})


def hnp_ints(shape, n):
    return hnp.arrays(np.int64, shape, elements=st.integers(0, n - 1))


@st.composite
def concat_case(draw, new_axis: bool = False):
    k = draw(st.integers(1, 3))
    base = draw(shapes(min_dims=1))
    nd = len(base)
    if new_axis:
        axis = draw(st.integers(-nd - 1, nd))
        arrays = [draw(noncontiguous_arrays(base)) for _ in range(k)]
    else:
        axis = draw(st.integers(-nd, nd - 1))
        ax = axis % nd
        arrays = []
        for _ in range(k):
            s = list(base)
            s[ax] = draw(st.integers(1, 3))
            arrays.append(draw(noncontiguous_arrays(tuple(s))))
    return Case(arrays, {"axis": axis})


@st.composite
def where_case(draw):
    sc, sa, sb = draw(broadcastable_shapes(3))
    cond = draw(hnp_bools(sc))
    return Case([draw(noncontiguous_arrays(sa)), draw(noncontiguous_arrays(sb))], {"cond": cond})


def hnp_bools(shape):
    return hnp.arrays(np.bool_, shape, elements=st.booleans())


@st.composite
def masked_fill_case(draw):
    shape = draw(shapes(min_dims=1))
    drop = draw(st.integers(0, len(shape)))
    mshape = tuple(1 if draw(st.booleans()) else n for n in shape[drop:])
    value = draw(st.sampled_from([0.0, -1e9, 2.5]))
    return Case(
        [draw(noncontiguous_arrays(shape))], {"mask": draw(hnp_bools(mshape)), "value": value}
    )


@st.composite
def softmax_case(draw, scale: float = 1.0):
    shape = draw(shapes(min_dims=1))
    x = draw(noncontiguous_arrays(shape)) * scale
    return Case([x], {"axis": draw(st.integers(-len(shape), len(shape) - 1))})


@st.composite
def cross_entropy_case(draw):
    lead = draw(shapes(1, 2, max_side=4))
    c = draw(st.integers(2, 5))
    logits = draw(noncontiguous_arrays((*lead, c)))
    ignore_index = draw(st.sampled_from([-100, -1]))
    t = draw(hnp_ints(lead, c))
    drop = draw(hnp_bools(lead))
    drop.reshape(-1)[0] = False  # at least one target counts
    t = np.where(drop, ignore_index, t)
    return Case([logits], {"targets": t, "ignore_index": ignore_index})


@st.composite
def layer_norm_case(draw):
    lead = draw(shapes(0, 2, max_side=3))
    d = draw(st.integers(3, 6))  # D = 2: x̂ = ±1 whatever x, the VJP is O(ε_LN) and FD noise wins
    x = draw(float_arrays((*lead, d)))
    x = x + np.linspace(-1.0, 1.0, d)  # rows are never constant (σ² ≥ ~0.3 is well conditioned)
    x = with_layout(x, draw(layouts()))
    w = draw(float_arrays((d,), 0.5, 2.0))
    b = draw(float_arrays((d,)))
    return Case([x, w, b], {"eps": 1e-5})


@st.composite
def dropout_case(draw):
    c = draw(unary(min_dims=1))
    return Case(
        c.arrays, {"p": draw(st.sampled_from([0.1, 0.5, 0.9])), "seed": draw(st.integers(0, 99))}
    )


# ---------------------------------------------------------------------------- references
def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_cross_entropy(z, targets, ignore_index):
    valid = targets != ignore_index
    logp = sps.log_softmax(z, axis=-1)
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return np.asarray(-picked[valid].mean())


def ref_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _generator(seed):
    """The current backend's generator for ``seed``: masks are drawn where the data lives."""
    return backend.xp().random.default_rng(seed)


def ref_dropout(x, p, seed):
    keep = host(_generator(seed).random(x.shape)) >= p
    return x * keep / (1.0 - p)


def impl_pow(x, p):
    return ops.pow(x, p)


def impl_concat(*xs, axis):
    return ops.concat(xs, axis)


def impl_stack(*xs, axis):
    return ops.stack(xs, axis)


def impl_where(a, b, cond):
    return ops.where(cond, a, b)


def impl_dropout(x, p, seed):
    return ops.dropout(x, p, rng=_generator(seed))


def _nudge(fn):
    def kink(case: Case) -> Case:
        return Case([fn(a) for a in case.arrays], case.kw)

    return kink


OPS: list[OpCase] = [
    OpCase("add", np.add, ops.add, binary()),
    OpCase("sub", np.subtract, ops.sub, binary()),
    OpCase("mul", np.multiply, ops.mul, binary()),
    OpCase("div", np.divide, ops.div, binary(b_away_from_zero=True)),
    OpCase("neg", np.negative, ops.neg, unary()),
    # x = 0 is no kink for x³, but there the VJP is 0 and the O(ε²) truncation error of the
    # central difference has nothing to be relative to: keep |x| ≥ 0.01
    OpCase("pow", lambda x, p: np.power(x, float(p)), impl_pow, pow_case(), _nudge(off_kinks)),
    OpCase("exp", np.exp, ops.exp, unary()),
    OpCase("log", np.log, ops.log, unary(0.1, 4.0)),
    OpCase("sqrt", np.sqrt, ops.sqrt, unary(0.1, 4.0)),
    OpCase("tanh", np.tanh, ops.tanh, unary()),
    OpCase("sigmoid", sps.expit, ops.sigmoid, unary(-6.0, 6.0)),  # tails: see below
    OpCase("relu", lambda x: np.maximum(x, 0.0), ops.relu, unary(), _nudge(off_kinks)),
    OpCase("gelu", ref_gelu_tanh, ops.gelu, unary(-5.0, 5.0)),
    OpCase("matmul", np.matmul, ops.matmul, matmul_case()),
    OpCase("sum", np.sum, ops.sum, reduce_case()),
    OpCase("mean", np.mean, ops.mean, reduce_case()),
    OpCase("max", np.max, ops.max, reduce_case(), _nudge(distinct)),
    OpCase("var", np.var, ops.var, reduce_case(ddof=True)),
    OpCase("reshape", np.reshape, ops.reshape, reshape_case()),
    OpCase("transpose", np.transpose, ops.transpose, transpose_case()),
    OpCase("getitem", lambda x, index: x[index], ops.getitem, getitem_case()),
    OpCase("embedding", lambda w, ids: np.take(w, ids, axis=0), ops.embedding, embedding_case()),
    OpCase("concat", lambda *xs, axis: np.concatenate(xs, axis), impl_concat, concat_case()),
    OpCase("stack", lambda *xs, axis: np.stack(xs, axis), impl_stack, concat_case(new_axis=True)),
    OpCase("where", lambda a, b, cond: np.where(cond, a, b), impl_where, where_case()),
    OpCase("masked_fill", lambda x, mask, value: np.where(mask, value, x), ops.masked_fill,
           masked_fill_case()),
    OpCase("softmax", lambda x, axis: sps.softmax(x, axis=axis), ops.softmax, softmax_case()),
    OpCase("log_softmax", lambda x, axis: sps.log_softmax(x, axis=axis), ops.log_softmax,
           softmax_case()),
    OpCase("cross_entropy", ref_cross_entropy, ops.cross_entropy, cross_entropy_case()),
    OpCase("layer_norm", ref_layer_norm, ops.layer_norm, layer_norm_case()),
    OpCase("astype", lambda x: x.astype(np.float64), lambda x: ops.astype(x, np.float64), unary()),
    OpCase("dropout", ref_dropout, impl_dropout, dropout_case()),  # one fixed mask per seed
]  # fmt: skip
BY_NAME = {op.name: op for op in OPS}


def _run(op: OpCase, tensors: list[Tensor], kw: dict[str, Any]) -> Tensor:
    return op.impl(*tensors, **kw)


def _placed(case: Case) -> Case:
    """The case on the current backend: its arrays and array arguments (masks, ids,
    targets, index arrays) moved there, as a model moves its inputs once at its entry."""

    def move(v):
        if isinstance(v, np.ndarray) and v.ndim > 0:
            return backend.to_device(v)
        if isinstance(v, tuple):
            return tuple(move(i) for i in v)
        return v

    return Case([move(a) for a in case.arrays], {k: move(v) for k, v in case.kw.items()})


def _assert_placed(*arrays) -> None:
    """Every array lives on the current backend (a device result never fell to the host)."""
    want = backend.get_backend()
    for a in arrays:
        if a is not None:
            assert backend.placement(a) == want, f"an array fell to {backend.placement(a)}"


def _instrument(out: Tensor) -> list[tuple[Function, tuple]]:
    """Wrap ``backward`` of every Function in the graph of ``out`` to record what it returns."""
    calls: list[tuple[Function, tuple]] = []
    seen: set[int] = set()
    stack = [out]
    while stack:
        t = stack.pop()
        fn = t._ctx
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))

        def wrapped(g, fn=fn, orig=fn.backward):
            res = orig(g)
            res = res if isinstance(res, tuple) else (res,)
            calls.append((fn, fn.needs_input_grad, res))
            return res

        fn.backward = wrapped  # instance attribute shadows the method; release() drops it
        stack.extend(fn.parents)
    return calls


# ---------------------------------------------------------------------------- 1. forward
@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@settings(max_examples=MAX_EXAMPLES)
@given(data=st.data())
def test_forward_matches_numpy_reference(op, where, data):
    case = op.kink(data.draw(op.inputs))
    with on_backend(where):
        expected = np.asarray(op.ref(*case.arrays, **case.kw))
        placed = _placed(case)
        out = _run(op, [Tensor(a) for a in placed.arrays], placed.kw)
        _assert_placed(out.data)
        assert out.dtype == np.float64 and out.shape == expected.shape
        np.testing.assert_allclose(host(out.data), expected, rtol=1e-10, atol=1e-12)
        # float32 in, float32 out, equal to the float64 reference to float32 accuracy
        out32 = _run(op, [Tensor(a.astype(np.float32)) for a in placed.arrays], placed.kw)
        if op.name != "astype":
            assert out32.dtype == np.float32, f"{op.name}: float32 input gave {out32.dtype}"
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        np.testing.assert_allclose(host(out32.data), expected, rtol=2e-5, atol=2e-6 * scale)


# ---------------------------------------------------------------------------- 2. gradient
@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@settings(max_examples=MAX_EXAMPLES)
@given(data=st.data())
def test_vjp_matches_central_differences(op, where, data):
    case = op.kink(data.draw(op.inputs))
    n = len(case.arrays)
    with on_backend(where):
        placed = _placed(case)
        # gradcheck runs f where its inputs live: the device's forward and backward
        res = gradcheck(lambda *ts: _run(op, list(ts), placed.kw), placed.arrays)
        assert res.max_rel_error < GRAD_TOL, f"{op.name}: {res}"
        # the analytic gradient does not depend on how the inputs are laid out in memory
        w = backend.to_device(
            np.random.default_rng(0).standard_normal(np.shape(op.ref(*case.arrays, **case.kw)))
        )
        grads = []
        for arrays in (placed.arrays, [backend.xp().ascontiguousarray(a) for a in placed.arrays]):
            ts = [Tensor(a, requires_grad=True) for a in arrays]
            (_run(op, ts, placed.kw) * Tensor(w)).sum().backward()
            _assert_placed(*(t.grad for t in ts))
            grads.append([host(t.grad) if t.grad is not None else 0 * host(t.data) for t in ts])
        for i in range(n):
            np.testing.assert_allclose(grads[0][i], grads[1][i], rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------- 3. frozen
@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@settings(max_examples=MAX_EXAMPLES)
@given(data=st.data())
def test_frozen_inputs_get_no_gradient_and_none_is_computed(op, where, data):
    with on_backend(where):
        _frozen_inputs(op, _placed(op.kink(data.draw(op.inputs))))


def _frozen_inputs(op: OpCase, case: Case) -> None:
    n = len(case.arrays)
    with no_grad():
        out = _run(op, [Tensor(a, requires_grad=True) for a in case.arrays], case.kw)
    assert out._ctx is None and not out.requires_grad
    out = _run(op, [Tensor(a) for a in case.arrays], case.kw)  # nothing requires grad
    assert out._ctx is None and not out.requires_grad
    if n < 2:
        return
    w = backend.to_device(np.random.default_rng(1).standard_normal(out.shape))
    full = [Tensor(a, requires_grad=True) for a in case.arrays]
    (_run(op, full, case.kw) * Tensor(w)).sum().backward()
    for frozen in range(n):
        ts = [Tensor(a, requires_grad=(i != frozen)) for i, a in enumerate(case.arrays)]
        y = _run(op, ts, case.kw)
        calls = _instrument(y)
        (y * Tensor(w)).sum().backward()
        assert ts[frozen].grad is None
        for fn, needs, returned in calls:
            for need, g in zip(needs, returned):
                if not need:
                    assert g is None, f"{type(fn).__name__} computed a gradient nobody needs"
        assert calls, "backward ran no Function"
        for i in range(n):
            if i != frozen:
                _assert_placed(ts[i].grad)
                np.testing.assert_allclose(
                    host(ts[i].grad), host(full[i].grad), rtol=1e-13, atol=1e-14
                )


# ---------------------------------------------------------------------------- special cases
def test_max_ties_share_the_gradient_equally():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    ops.max(x, axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    x32 = Tensor(np.array([5.0, 5.0], dtype=np.float32), requires_grad=True)
    ops.max(x32).backward()
    assert x32.grad.dtype == np.float32  # the tie weights do not promote to float64
    np.testing.assert_array_equal(x32.grad, [0.5, 0.5])


def test_relu_at_the_kink_has_zero_gradient_like_pytorch():
    x = Tensor(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    y = ops.relu(x)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 1.0])
    assert not np.signbit(y.data).any()  # no −0.0 for negative inputs


def test_sigmoid_tails_keep_full_relative_accuracy():
    x = np.linspace(-60.0, 60.0, 1201)
    t = Tensor(x, requires_grad=True)
    y = ops.sigmoid(t)
    y.sum().backward()
    np.testing.assert_allclose(y.data, sps.expit(x), rtol=4e-15, atol=0)
    np.testing.assert_allclose(t.grad, sps.expit(x) * sps.expit(-x), rtol=4e-15, atol=0)
    assert (t.grad > 0).all()  # y(1 − y) computed naively is exactly 0 for x > 37


def test_gelu_tanh_form_is_close_to_the_erf_closed_form():
    x = np.linspace(-6, 6, 2001)
    exact = x * 0.5 * (1 + sps.erf(x / math.sqrt(2)))  # x·Φ(x)
    approx = ops.gelu(Tensor(x)).data
    # the tanh form (Hendrycks & Gimpel 2016) deviates from x·Φ(x) by < 5e-4 everywhere
    err = np.max(np.abs(approx - exact))
    assert 1e-5 < err < 5e-4
    np.testing.assert_allclose(approx, ref_gelu_tanh(x), rtol=1e-14, atol=1e-15)


def test_gelu_survives_huge_inputs_without_nan():
    x = Tensor(np.array([-1e30, -50.0, 50.0, 1e30], dtype=np.float32), requires_grad=True)
    y = ops.gelu(x)
    y.sum().backward()
    np.testing.assert_array_equal(y.data, np.array([0.0, 0.0, 50.0, 1e30], dtype=np.float32))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_is_stable_for_logits_of_magnitude_1e4(fn):
    rng = np.random.default_rng(3)
    z = 1e4 * rng.standard_normal((4, 7))
    ref = sps.softmax(z, axis=-1) if fn == "softmax" else sps.log_softmax(z, axis=-1)
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        x = Tensor(z.astype(dtype), requires_grad=True)
        y = getattr(ops, fn)(x)
        assert np.isfinite(y.data).all() or fn == "log_softmax"
        mask = np.isfinite(ref)
        np.testing.assert_allclose(y.data[mask], ref[mask], rtol=rtol, atol=rtol)
        y.backward(np.ones(y.shape, dtype=dtype))
        assert np.isfinite(x.grad).all()
        # softmax is invariant to adding a constant per row, so each gradient row sums to 0
        np.testing.assert_allclose(x.grad.sum(-1), 0.0, atol=1e-6 if fn == "softmax" else 1e-3)


def test_cross_entropy_ignore_index_rows_get_no_loss_and_no_gradient():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((2, 3, 5))
    t = np.array([[1, -100, 4], [-100, 0, 2]])
    x = Tensor(z, requires_grad=True)
    loss = ops.cross_entropy(x, t)
    keep = t != -100
    np.testing.assert_allclose(loss.item(), ref_cross_entropy(z, t, -100), rtol=1e-13)
    loss.backward()
    np.testing.assert_array_equal(x.grad[~keep], 0.0)
    # valid rows: (softmax − onehot) / n_valid
    p = sps.softmax(z, axis=-1)
    onehot = np.eye(5)[np.where(keep, t, 0)]
    np.testing.assert_allclose(x.grad[keep], ((p - onehot) / keep.sum())[keep], rtol=1e-12)
    # an ignored row full of −inf does not poison the loss
    z2 = z.copy()
    z2[0, 1] = -np.inf
    assert np.isfinite(ops.cross_entropy(Tensor(z2), t).item())
    # every target ignored: 0/0 is NaN, as in PyTorch
    assert np.isnan(ops.cross_entropy(Tensor(z), np.full((2, 3), -100)).item())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics_and_backward_reuses_the_forward_mask(p):
    x = Tensor(np.ones((200, 250)), requires_grad=True)
    y = ops.dropout(x, p, rng=np.random.default_rng(7))
    kept = y.data != 0
    n = kept.size
    # zero fraction ~ Binomial(n, p)/n: within 5 standard deviations
    assert abs((1 - kept.mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(y.data[kept], 1 / (1 - p), rtol=1e-15)  # inverted scaling
    assert abs(y.data.mean() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # E[y] = x
    g = np.random.default_rng(8).standard_normal(x.shape)
    y.backward(g)
    np.testing.assert_array_equal(x.grad != 0, kept)  # the same mask, not a fresh draw
    np.testing.assert_allclose(x.grad[kept], g[kept] / (1 - p), rtol=1e-15)


def test_dropout_off_in_eval_and_p_zero_returns_the_input():
    x = Tensor(np.ones(3), requires_grad=True)
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="p"):
        ops.dropout(x, 1.5)


def test_repeated_advanced_indices_accumulate():
    x = Tensor(np.arange(4.0), requires_grad=True)
    ops.getitem(x, np.array([1, 1, 3, 1])).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 3.0, 0.0, 1.0])
    w = Tensor(np.zeros((3, 2)), requires_grad=True)
    ops.embedding(w, np.array([[2, 2], [0, 2]])).sum().backward()
    np.testing.assert_array_equal(w.grad, [[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])


def test_cast_gradient_returns_to_the_source_dtype():
    x = Tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    y = ops.astype(x, np.float64)
    assert y.dtype == np.float64
    (y * 3.0).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])
    assert not ops.astype(x, np.int64).requires_grad  # no gradient through rounding
