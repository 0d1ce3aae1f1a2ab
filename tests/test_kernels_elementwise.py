"""Numba elementwise kernels (minipeft/kernels/cpu/elementwise.py) against their NumPy
references: GELU value and derivative, float64 bit for bit, float32 within 1 ulp of the
float64 value; the op that uses them; and the same loops under NUMBA_DISABLE_JIT=1."""

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


def test_gelu_need_grad_false_returns_the_same_value_and_no_derivative():
    x = GRID.astype(np.float32)
    y, dy = ew.gelu_fused(x, need_grad=False)
    assert dy is None
    assert y.tobytes() == ew.gelu_fused(x)[0].tobytes()
    y_ref, dy_ref = ew.gelu_reference(x, need_grad=False)
    assert dy_ref is None and y_ref.shape == x.shape


def test_gelu_special_values_agree_with_the_reference():
    x = np.array([np.nan, np.inf, -np.inf, 1e308, -1e308, 20.0, -20.0, 20.5, -20.5])
    y, dy = ew.gelu_fused(x)
    with np.errstate(invalid="ignore", over="ignore"):
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
    y_k, dy_k = ew.gelu_fused(x)
    assert y.data.tobytes() == y_k.tobytes()
    assert t.grad.tobytes() == (g * dy_k).tobytes()  # x̄ = ḡ ⊙ y'


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
        """
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    y_hex, dy_hex = out.stdout.split()
    x = np.concatenate([np.linspace(-25, 25, 301), [-0.0, 0.0, -0.75]]).astype(np.float32)
    y, dy = ew.gelu_fused(x)
    assert y.tobytes().hex() == y_hex and dy.tobytes().hex() == dy_hex
