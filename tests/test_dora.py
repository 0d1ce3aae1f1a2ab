"""DoRA: output equals the paper's formula, detached-norm backward vs finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd.gradcheck import gradcheck, numerical_grad
from minipeft.autograd.tensor import Tensor
from minipeft.nn import Linear
from minipeft.nn.conv1d import Conv1D
from minipeft.peft import LoraLayer, dora_delta
from minipeft.peft.dora import dora_reference_output


def _detached_reference(x, w0, m, a, b, s, n, mask=None):
    """Δ with the norm n held constant: what the paper's §4.3 differentiates (NumPy)."""
    xd = x if mask is None else x * mask
    c = m / n
    return (c - 1) * (xd @ w0.T) + s * c * (xd @ a.T @ b.T)


@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.booleans(),
    st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_dora_backward_matches_finite_differences_with_detached_norm(d_in, d_out, n, drop, seed):
    rng = np.random.default_rng(seed)
    r = rng.integers(1, min(d_in, d_out) + 1)
    x, w0 = rng.standard_normal((n, d_in)), rng.standard_normal((d_out, d_in))
    a, b = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    m, s = rng.random(d_out) + 0.5, 0.7
    mask = (rng.random(x.shape) > 0.4) / 0.6 if drop else None
    nrm = np.linalg.norm(w0 + s * b @ a, axis=1)  # detached: evaluated at the current A, B
    g = rng.standard_normal((n, d_out))
    ts = [Tensor(v, requires_grad=True) for v in (x, m, a, b)]
    (dora_delta(ts[0], Tensor(w0), ts[1], ts[2], ts[3], s, mask=mask) * Tensor(g)).sum().backward()
    inputs = [x, m, a, b]

    def loss(x, m, a, b):
        return Tensor(np.sum(g * _detached_reference(x.data, w0, m.data, a.data, b.data, s, nrm,
                                                     mask)))  # fmt: skip

    for i, t in enumerate(ts):
        fd = numerical_grad(loss, inputs, i)
        # judged against the gradient's scale: tiny entries carry O(1e-10) difference noise
        assert np.abs(t.grad - fd).max() <= 1e-6 * max(1.0, np.abs(fd).max())


def test_detaching_the_norm_changes_the_gradient_of_A_and_B_only():
    """Finite differences through the norm differ from the detached gradient (the paper's choice),
    while ∂L/∂m and ∂L/∂x (no dropout) are exact either way."""
    rng = np.random.default_rng(0)
    x, w0 = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    a, b, m = rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), rng.random(4) + 1

    def f(x, m, a, b):
        return dora_delta(x, Tensor(w0), m, a, b, 0.7)

    res = gradcheck(f, [x, m, a, b])
    assert res.per_input[0] < 1e-6 and res.per_input[1] < 1e-6
    assert res.per_input[2] > 1e-3 and res.per_input[3] > 1e-3


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_layer_output_merge_and_init(kind):
    with backend.dtype_policy("float64"):
        backend.seed(0)
        base = Linear(6, 5) if kind == "linear" else Conv1D(6, 5)
        layer = LoraLayer(base)
        layer.add_adapter("d", r=2, lora_alpha=4, use_dora=True)
    x = Tensor(np.random.default_rng(1).standard_normal((3, 6)))
    np.testing.assert_allclose(layer(x).data, base(x).data, atol=1e-12)  # W' = W₀ at init
    w0 = layer._w0_out_in().copy()
    np.testing.assert_allclose(
        layer.lora_magnitude_vector["d"].weight.data, np.linalg.norm(w0, axis=1), atol=1e-12
    )
    rng = np.random.default_rng(2)
    for p in (layer.lora_B["d"].weight, layer.lora_magnitude_vector["d"].weight):
        p.data[...] += rng.standard_normal(p.shape)
    a, b = layer.lora_A["d"].weight.data, layer.lora_B["d"].weight.data
    m = layer.lora_magnitude_vector["d"].weight.data
    y = layer(x).data
    np.testing.assert_allclose(
        y, dora_reference_output(x.data, w0, base.bias.data, m, a, b, 2.0), atol=1e-12
    )
    layer.merge()
    np.testing.assert_allclose(layer(x).data, y, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer._w0_out_in(), w0, atol=1e-12)
