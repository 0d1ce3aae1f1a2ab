"""IA3 output/input scaling: gradients vs finite differences, identity init, merge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor
from minipeft.nn import Linear
from minipeft.nn.conv1d import Conv1D
from minipeft.peft import IA3Layer, ia3_linear


@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_ia3_backward_matches_finite_differences(d_in, d_out, ff, fifo, use_bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((2, 3, d_in)), rng.standard_normal((d_out, d_in))
    w0 = Tensor(np.ascontiguousarray(w.T) if fifo else w)
    l = rng.standard_normal((1, d_in) if ff else (d_out, 1))

    def f(x, bias, l):
        return ia3_linear(x, w0, bias if use_bias else None, l, is_feedforward=ff,
                          fan_in_fan_out=fifo)  # fmt: skip

    assert gradcheck(f, [x, rng.standard_normal(d_out), l]).max_rel_error < 1e-6


@pytest.mark.parametrize("ff", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ia3_identity_init_and_exact_merge(ff, kind):
    with backend.dtype_policy("float64"):
        backend.seed(0)
        base = Linear(5, 4) if kind == "linear" else Conv1D(5, 4)
        base.bias.data[...] = np.random.default_rng(3).standard_normal(4)
        layer = IA3Layer(base, "default", is_feedforward=ff)
    x = Tensor(np.random.default_rng(1).standard_normal((3, 5)))
    np.testing.assert_array_equal(layer(x).data, base(x).data)
    l = np.random.default_rng(2).standard_normal(layer.vector.shape)
    layer.vector.data[...] = l
    w_oi = base.weight.data.T if kind == "conv1d" else base.weight.data
    if ff:  # H = (X ⊙ l)·W₀ᵀ + b
        ref = (x.data * l.reshape(-1)) @ w_oi.T + base.bias.data
    else:  # H = (X·W₀ᵀ + b) ⊙ l
        ref = (x.data @ w_oi.T + base.bias.data) * l.reshape(-1)
    y = layer(x).data
    np.testing.assert_allclose(y, ref, atol=1e-12)
    w_before = base.weight.data.copy()
    layer.merge()
    np.testing.assert_allclose(layer(x).data, y, atol=1e-12)
    layer.unmerge()
    np.testing.assert_array_equal(base.weight.data, w_before)
