"""Numba elementwise kernels (minipeft/kernels/cpu/elementwise.py) against their NumPy
references: GELU value and derivative, float64 bit for bit, float32 within 1 ulp of the
float64 value; LayerNorm forward and backward within a few float64 rounding errors (float32:
within 1 ulp of the row's largest entry of the float64 value); the ops that use them; and
the same loops under NUMBA_DISABLE_JIT=1."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.special as sps
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_arrays, layouts, shapes, with_layout

from minipeft.autograd import Tensor, ops
from minipeft.kernels.cpu import elementwise as ew

# every regime: deep tails past the ±20 clip, the tails where σ(2u) is tiny, the zero of
# y' near −0.75, ±0, and the saturated right side
GRID = np.concatenate(
    [np.linspace(-40.0, 40.0, 8001), np.linspace(-1.0, -0.5, 2001), [-0.0, 0.0, 1e-300, -1e-300]]
)


def _ulps(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|a − ref| in units of the last place of ref (in ref's dtype)."""
    return np.abs(a.astype(np.float64) - ref.astype(np.float64)) / np.spacing(np.abs(ref)).astype(
        np.float64
    )


def test_gelu_float64_equals_the_reference_bit_for_bit():
    """Same operations, same order, same NumPy exp: identical bits, value and derivative."""
    y, dy = ew.gelu_fused(GRID)
    y_ref, dy_ref = ew.gelu_reference(GRID)
    assert y.tobytes() == y_ref.tobytes()
    assert dy.tobytes() == dy_ref.tobytes()


def test_gelu_float32_is_the_float64_value_rounded_once():
    """float32 in, float64 inside: within 1 ulp of the float64 reference rounded to float32
    (0 on this grid); the float32 reference itself is off by up to ~200 ulp in the tails."""
    x = GRID.astype(np.float32)
    y, dy = ew.gelu_fused(x)
    assert y.dtype == dy.dtype == np.float32
    y64, dy64 = ew.gelu_reference(x.astype(np.float64))
    assert _ulps(y, y64.astype(np.float32)).max() <= 1
    assert _ulps(dy, dy64.astype(np.float32)).max() <= 1
    # against the float32 reference: its own rounding error, a few ulp away from the tails
    y32, dy32 = ew.gelu_reference(x)
    core = np.abs(x) <= 3
    assert _ulps(y[core], y32[core]).max() <= 16
    np.testing.assert_allclose(dy, dy32, rtol=0, atol=4e-6)  # absolute: y' ∈ [−0.17, 1.13]


def test_gelu_matches_its_definition_through_scipy():
    """Reference independent of the code: y = ½x(1 + tanh u), y' by the product rule, both
    in float64 with SciPy's expit form of tanh where 1 + tanh cancels (x ≥ −5 here)."""
    x = np.linspace(-5.0, 8.0, 1301)
    c, k = math.sqrt(2.0 / math.pi), 0.044715
    u = c * (x + k * x**3)
    s = sps.expit(2 * u)  # ½(1 + tanh u)
    y, dy = ew.gelu_fused(x)
    np.testing.assert_allclose(y, x * s, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(dy, s + 2 * x * s * (1 - s) * c * (1 + 3 * k * x**2), rtol=1e-13)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_gelu_chunks_do_not_change_a_bit(chunk, monkeypatch):
    """The sweeps run chunk by chunk through a small scratch: any chunk size, same bits."""
    x32 = GRID.astype(np.float32)
    whole = ew.gelu_fused(x32)
    monkeypatch.setattr(ew, "GELU_CHUNK", chunk)
    for got, ref in zip(ew.gelu_fused(x32), whole):
        assert got.tobytes() == ref.tobytes()
    for got, ref in zip(ew.gelu_fused(GRID), ew.gelu_reference(GRID)):
        assert got.tobytes() == ref.tobytes()
    assert ew.gelu_fused(x32, need_grad=False)[0].tobytes() == whole[0].tobytes()


def test_gelu_need_grad_false_returns_the_same_value_and_no_derivative():
    x = GRID.astype(np.float32)
    y, dy = ew.gelu_fused(x, need_grad=False)
    assert dy is None
    assert y.tobytes() == ew.gelu_fused(x)[0].tobytes()
    y_ref, dy_ref = ew.gelu_reference(x, need_grad=False)
    assert dy_ref is None and y_ref.shape == x.shape


def test_gelu_special_values_agree_with_the_reference():
    x = np.array([np.nan, np.inf, -np.inf, 1e308, -1e308, 20.0, -20.0, 20.5, -20.5])
    with np.errstate(invalid="ignore", over="ignore"):  # inf·0 (as Python under DISABLE_JIT)
        y, dy = ew.gelu_fused(x)
        y_ref, dy_ref = ew.gelu_reference(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dy, dy_ref)


@given(
    shapes(min_dims=0, max_dims=3, max_side=5).flatmap(
        lambda s: st.tuples(float_arrays(s, lo=-12.0, hi=12.0), layouts())
    ),
    st.sampled_from([np.float32, np.float64]),
)
def test_gelu_any_shape_and_layout(case, dtype):
    x, layout = case
    x = with_layout(x.astype(dtype), layout)
    y, dy = ew.gelu_fused(x)
    assert y.shape == dy.shape == x.shape and y.dtype == dtype
    y64, dy64 = ew.gelu_reference(np.asarray(x, dtype=np.float64))
    if dtype == np.float64:
        np.testing.assert_array_equal(y, y64)
        np.testing.assert_array_equal(dy, dy64)
    else:
        assert _ulps(y, y64.astype(np.float32)).max(initial=0) <= 1
        assert _ulps(dy, dy64.astype(np.float32)).max(initial=0) <= 1


@pytest.mark.parametrize("bad", [np.ones(3, dtype=np.float16), np.ones(3, dtype=np.int64), [1.0]])
def test_gelu_fused_rejects_other_inputs(bad):
    with pytest.raises(TypeError, match="x: expected a float32 or float64"):
        ew.gelu_fused(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_gelu_uses_the_fused_values_and_saves_one_array(dtype):
    x = GRID.astype(dtype)
    t = Tensor(x, requires_grad=True)
    y = ops.gelu(t)
    fn = y._ctx
    saved = [v for v in vars(fn).values() if isinstance(v, np.ndarray) and v.shape == x.shape]
    assert len(saved) == 1  # y' alone
    g = np.linspace(-1.0, 1.0, x.size).astype(dtype)
    y.backward(g)
    # the kernel where Numba compiles; the NumPy reference under NUMBA_DISABLE_JIT=1
    y_k, dy_k = (ew.gelu_fused if ew.JIT else ew.gelu_reference)(x)
    assert y.data.tobytes() == y_k.tobytes()
    assert t.grad.tobytes() == (g * dy_k).tobytes()  # x̄ = ḡ ⊙ y'


# ---------------------------------------------------------------------------- LayerNorm
def _ln_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x = rng.standard_normal(shape) * 3.0 + 1.0
    w, b = 1.0 + 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)
    g = rng.standard_normal(shape)
    return [a.astype(dtype) for a in (x, w, b, g)]


def _close(a, ref, ulps, eps):
    """|a − ref| ≤ ulps · eps · max|ref| (rounding errors scale with the largest entry)."""
    np.testing.assert_allclose(a, ref, rtol=0, atol=ulps * eps * np.max(np.abs(ref)))


ALL = (True, True, True)


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 256), (3, 1), (4, 13)])
def test_layer_norm_float64_matches_the_reference(shape):
    x, w, b, g = _ln_inputs(shape, np.float64)
    y, xhat, r = ew.layer_norm_fused(x, w, b, 1e-5)
    y0, xhat0, r0 = ew.layer_norm_reference(x, w, b, 1e-5)
    eps = np.finfo(np.float64).eps
    _close(y, y0, 8, eps)
    _close(xhat, xhat0, 8, eps)
    _close(r, r0, 8, eps)
    grads = ew.layer_norm_backward_fused(g, xhat, r, w, ALL)
    refs = ew.layer_norm_backward_reference(g, xhat0, r0, w, ALL)
    for a, ref in zip(grads, refs):
        assert a.shape == ref.shape and a.dtype == np.float64
        _close(a, ref, 64, eps)  # γ̄, β̄ sum N rows: the reference's own error grows with N


@pytest.mark.parametrize("shape", [(2, 5, 16), (64, 256)])
def test_layer_norm_float32_is_the_float64_value_rounded(shape):
    """float32 in, float64 inside: within 1 ulp of the largest entry of the float64 result
    (the float32 reference sums γ̄, β̄ row by row in float32 and is ~10× further off)."""
    x, w, b, g = _ln_inputs(shape, np.float32)
    y, xhat, r = ew.layer_norm_fused(x, w, b, 1e-5)
    assert y.dtype == xhat.dtype == np.float32
    y64, xhat64, r64 = ew.layer_norm_reference(*(a.astype(np.float64) for a in (x, w, b)), 1e-5)
    eps = np.finfo(np.float32).eps
    _close(y, y64, 1, eps)
    _close(xhat, xhat64, 1, eps)
    grads = ew.layer_norm_backward_fused(g, xhat, r, w, ALL)
    refs = ew.layer_norm_backward_reference(
        g.astype(np.float64), xhat64, r64, w.astype(np.float64), ALL
    )
    for a, ref in zip(grads, refs):
        assert a.dtype == np.float32
        _close(a, ref, 2, eps)  # x̂ itself was rounded to float32 before backward


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_layer_norm_backward_computes_only_what_is_needed(needs):
    x, w, b, g = _ln_inputs((6, 8), np.float64)
    _, xhat, r = ew.layer_norm_fused(x, w, b, 1e-5)
    got = ew.layer_norm_backward_fused(g, xhat, r, w, needs)
    ref = ew.layer_norm_backward_reference(g, xhat, r, w, ALL)
    for need, a, e in zip(needs, got, ref):
        if need:
            _close(a, e, 16, np.finfo(np.float64).eps)
        else:
            assert a is None


@given(
    shapes(min_dims=1, max_dims=3, max_side=6).flatmap(
        lambda s: st.tuples(float_arrays(s, lo=-5.0, hi=5.0), layouts())
    ),
)
def test_ops_layer_norm_any_layout_matches_the_reference(case):
    x, layout = case
    x = with_layout(x, layout)
    d = x.shape[-1]
    w, b = np.linspace(0.5, 1.5, d), np.linspace(-0.2, 0.2, d)
    t, tw, tb = (Tensor(a, requires_grad=True) for a in (x, w, b))
    y = ops.layer_norm(t, tw, tb)
    g = np.cos(np.arange(x.size, dtype=np.float64)).reshape(x.shape)
    y.backward(g)
    y0, xhat0, r0 = ew.layer_norm_reference(np.asarray(x), w, b, 1e-5)
    refs = ew.layer_norm_backward_reference(g, xhat0, r0, w, ALL)
    eps = np.finfo(np.float64).eps
    _close(y.data, y0, 8, eps)
    for a, ref in zip((t.grad, tw.grad, tb.grad), refs):
        _close(a, ref, 64, eps)


# ---------------------------------------------------------------------------- scatter-add
@given(
    st.integers(1, 6),
    st.integers(0, 40),
    st.integers(1, 5),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 2**31),
)
def test_scatter_add_rows_equals_np_add_at_bit_for_bit(v, n, d, dtype, seed):
    """Repeated ids accumulate in the order given, exactly as np.add.at adds them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, v, n)
    g = (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-3, 4, (n, 1))).astype(dtype)
    start = rng.standard_normal((v, d)).astype(dtype)
    ref = start.copy()
    np.add.at(ref, ids, g)
    out = start.copy()
    ew.scatter_add_rows(out, ids, g)
    assert out.tobytes() == ref.tobytes()


@pytest.mark.parametrize(
    ("ids", "g", "exc", "name"),
    [
        (np.array([0, 3]), np.ones((2, 2)), ValueError, "ids"),
        (np.array([-1, 0]), np.ones((2, 2)), ValueError, "ids"),
        (np.array([0.0, 1.0]), np.ones((2, 2)), TypeError, "ids"),
        (np.array([0, 1]), np.ones((2, 3)), ValueError, "g"),
        (np.array([0, 1]), np.ones((2, 2), dtype=np.float32), ValueError, "g"),
    ],
)
def test_scatter_add_rows_rejects_bad_input(ids, g, exc, name):
    with pytest.raises(exc, match=name):
        ew.scatter_add_rows(np.zeros((3, 2)), ids, g)


def test_ops_embedding_gradient_is_the_scatter_add():
    rng = np.random.default_rng(0)
    w = Tensor(rng.standard_normal((7, 4)).astype(np.float32), requires_grad=True)
    ids = rng.integers(0, 7, (3, 5))
    g = rng.standard_normal((3, 5, 4)).astype(np.float32)
    ops.embedding(w, ids).backward(g)
    ref = np.zeros((7, 4), dtype=np.float32)
    np.add.at(ref, ids.reshape(-1), g.reshape(-1, 4))
    assert w.grad.tobytes() == ref.tobytes()


def test_kernels_run_as_python_under_disabled_jit():
    """NUMBA_DISABLE_JIT=1: the same loops, as Python over NumPy scalars, give the same
    bits as the compiled kernels (float64: the reference's bits)."""
    code = textwrap.dedent(
        """
        import numpy as np, numba
        assert numba.config.DISABLE_JIT
        from minipeft.kernels.cpu import elementwise as ew
        assert not ew.JIT
        x = np.concatenate([np.linspace(-25, 25, 301), [-0.0, 0.0, -0.75]])
        y, dy = ew.gelu_fused(x)
        y_ref, dy_ref = ew.gelu_reference(x)
        assert y.tobytes() == y_ref.tobytes() and dy.tobytes() == dy_ref.tobytes()
        y32, dy32 = ew.gelu_fused(x.astype(np.float32))
        print(y32.tobytes().hex(), dy32.tobytes().hex())
        rng = np.random.default_rng(0)
        x, w, b, g = rng.standard_normal((4, 9)), rng.random(9), rng.random(9), rng.random((4, 9))
        out = ew.layer_norm_fused(x, w, b, 1e-5)
        out += ew.layer_norm_backward_fused(g, out[1], out[2], w, (True, True, True))
        print(*(a.tobytes().hex() for a in out))
        ids = np.array([2, 0, 2, 1, 2])
        acc, ref = np.zeros((3, 9)), np.zeros((3, 9))
        ew.scatter_add_rows(acc, ids, g[[0, 1, 2, 3, 0]])
        np.add.at(ref, ids, g[[0, 1, 2, 3, 0]])
        assert acc.tobytes() == ref.tobytes()
        """
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    y_hex, dy_hex, *ln_hex = out.stdout.split()
    x = np.concatenate([np.linspace(-25, 25, 301), [-0.0, 0.0, -0.75]]).astype(np.float32)
    y, dy = ew.gelu_fused(x)
    assert y.tobytes().hex() == y_hex and dy.tobytes().hex() == dy_hex
    rng = np.random.default_rng(0)
    x, w, b, g = rng.standard_normal((4, 9)), rng.random(9), rng.random(9), rng.random((4, 9))
    ln = ew.layer_norm_fused(x, w, b, 1e-5)
    ln += ew.layer_norm_backward_fused(g, ln[1], ln[2], w, (True, True, True))
    assert [a.tobytes().hex() for a in ln] == ln_hex
