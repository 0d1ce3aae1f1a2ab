"""VeRA: ∂L/∂b, ∂L/∂d vs finite differences; init ΔW = 0; shared sliced projections (ERRATA 11)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor
from minipeft.nn import Linear, Module
from minipeft.peft import VeraConfig, get_peft_model, vera_linear


@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.booleans(), st.booleans(),
    st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_vera_backward_matches_finite_differences(d_in, d_out, r, fifo, drop, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((3, d_in)), rng.standard_normal((d_out, d_in))
    w0 = Tensor(np.ascontiguousarray(w.T) if fifo else w)
    pa, pb = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    mask = (rng.random(x.shape) > 0.4) / 0.6 if drop else None

    def f(x, bias, lb, ld):
        return vera_linear(x, w0, bias, lb, ld, pa, pb, mask=mask, fan_in_fan_out=fifo)

    res = gradcheck(f, [x, rng.standard_normal(d_out), rng.standard_normal(d_out),
                        rng.standard_normal(r)])  # fmt: skip
    assert res.max_rel_error < 1e-6


class _Two(Module):
    def __init__(self):
        super().__init__()
        self.q = Linear(6, 4)
        self.fc = Linear(4, 9)

    def forward(self, x):
        return self.fc(self.q(x))


def test_vera_init_counts_and_shared_projections():
    with backend.dtype_policy("float64"):
        backend.seed(0)
        model = _Two()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 6)))
    y0 = model(x).data
    pm = get_peft_model(model, VeraConfig(r=3, target_modules=["q", "fc"]))
    np.testing.assert_array_equal(pm(x).data, y0)  # b = 0: ΔW = 0 at init
    a = pm.base_model.vera_A.default
    b = pm.base_model.vera_B.default
    assert a.shape == (3, 6) and b.shape == (9, 3)  # sized to the largest target
    layers = dict(pm.adapter_layers())
    np.testing.assert_array_equal(layers["q"].projections()[0], a[:, :6])
    np.testing.assert_array_equal(layers["fc"].projections()[0], a[:, :4])
    np.testing.assert_array_equal(layers["q"].projections()[1], b[:4])
    assert np.all(layers["q"].lambda_d.data == 0.1) and np.all(layers["q"].lambda_b.data == 0)
    # trainable per layer: out + r (ERRATA 11), not in + out
    assert pm.get_nb_trainable_parameters()[0] == (4 + 3) + (9 + 3)
    # merge = Λ_b·B·Λ_d·A
    layers["q"].lambda_b.data[...] = np.arange(4.0)
    y = pm(x).data
    pm.merge_adapter()
    np.testing.assert_allclose(pm(x).data, y, atol=1e-12)
    pm.unmerge_adapter()
