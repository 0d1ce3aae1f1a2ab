"""LoRA layer: fused closed-form backward, inits, dropout, merge, named adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd import ops
from minipeft.autograd.gradcheck import gradcheck, rel_error
from minipeft.autograd.tensor import Tensor
from minipeft.nn import Linear
from minipeft.nn.conv1d import Conv1D
from minipeft.peft import LoraLayer, lora_linear, lora_scaling


@st.composite
def lora_case(draw):
    """Shapes (lead…, in), (out, in), rank r ≤ min(in, out), layout, bias, seed."""
    d_in = draw(st.integers(1, 7))
    d_out = draw(st.integers(1, 7))
    r = draw(st.integers(1, min(d_in, d_out)))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    return {
        "lead": lead, "d_in": d_in, "d_out": d_out, "r": r,
        "fifo": draw(st.booleans()), "bias": draw(st.booleans()),
        "s": draw(st.floats(0.1, 4.0)), "seed": draw(st.integers(0, 2**31 - 1)),
    }  # fmt: skip


def _arrays(c):
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((*c["lead"], c["d_in"]))
    w = rng.standard_normal((c["d_out"], c["d_in"]))
    if c["fifo"]:
        w = np.ascontiguousarray(w.T)
    b = rng.standard_normal(c["d_out"])
    a = rng.standard_normal((c["r"], c["d_in"]))
    bb = rng.standard_normal((c["d_out"], c["r"]))
    return x, w, b, a, bb


def _composition(x, w, b, a, bb, s, fifo, use_bias):
    """The same layer from primitive autograd ops (matmul, transpose, add, mul)."""
    wt = w if fifo else ops.transpose(w, (1, 0))
    h = ops.matmul(x, wt)
    if use_bias:
        h = h + b
    return h + ops.matmul(ops.matmul(x, ops.transpose(a, (1, 0))), ops.transpose(bb, (1, 0))) * s


@given(lora_case())
def test_fused_backward_equals_autograd_composition(c):
    x, w, b, a, bb = _arrays(c)
    rng = np.random.default_rng(c["seed"] + 1)
    g = rng.standard_normal((*c["lead"], c["d_out"]))
    grads = []
    for fused in (True, False):
        ts = [Tensor(v, requires_grad=True) for v in (x, w, b, a, bb)]
        if fused:
            y = lora_linear(ts[0], ts[1], ts[2] if c["bias"] else None,
                            [(ts[3], ts[4], c["s"])], fan_in_fan_out=c["fifo"])  # fmt: skip
        else:
            y = _composition(*ts, c["s"], c["fifo"], c["bias"])
        y.backward(g)
        grads.append([t.grad for t in ts] + [y.data])
    for i, (f, ref) in enumerate(zip(*grads)):
        if i == 2 and not c["bias"]:
            continue
        assert rel_error(f, ref, atol=1e-9) < 1e-9, i


@given(lora_case())
def test_fused_backward_matches_finite_differences(c):
    x, w, b, a, bb = _arrays(c)
    use_bias, fifo, s = c["bias"], c["fifo"], c["s"]

    def f(x, b, a, bb):
        return lora_linear(x, Tensor(w), b if use_bias else None, [(a, bb, s)], fan_in_fan_out=fifo)

    assert gradcheck(f, [x, b, a, bb]).max_rel_error < 1e-6


def test_two_adapters_and_dropout_masks_match_finite_differences():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    a1, b1 = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    a2, b2 = rng.standard_normal((3, 5)), rng.standard_normal((4, 3))
    mask = (rng.random(x.shape) > 0.3) / 0.7

    def f(x, b, a1, b1, a2, b2):
        return lora_linear(x, Tensor(w), b, [(a1, b1, 0.5), (a2, b2, 2.0)], masks=[mask, None])

    assert gradcheck(f, [x, b, a1, b1, a2, b2]).max_rel_error < 1e-6


class _Spy(np.ndarray):
    """An ndarray that counts the operations it takes part in."""

    uses = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        type(self).uses += 1
        args = [np.asarray(i) if isinstance(i, _Spy) else i for i in inputs]
        return getattr(ufunc, method)(*args, **kwargs)


def test_frozen_w0_gets_no_gradient_and_is_never_touched_in_backward():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).view(_Spy)
    w0 = Tensor(np.zeros((6, 5)))
    w0.data = w  # the frozen base weight, spied on
    x = Tensor(rng.standard_normal((4, 5)))  # input needs no gradient (first layer)
    a = Tensor(rng.standard_normal((2, 5)), requires_grad=True)
    bb = Tensor(rng.standard_normal((6, 2)), requires_grad=True)
    y = lora_linear(x, w0, None, [(a, bb, 1.0)])
    _Spy.uses = 0
    y.sum().backward()
    assert _Spy.uses == 0  # backward never read W₀ …
    assert w0.grad is None  # … and allocated no ∂L/∂W₀
    assert a.grad.shape == (2, 5) and bb.grad.shape == (6, 2)


def test_full_finetuning_gradient_of_w0_when_unfrozen():
    """If a user unfreezes W₀, ∂L/∂W₀ = Gᵀ·X is still right (both layouts)."""
    rng = np.random.default_rng(1)
    x, w, a, bb = (rng.standard_normal(s) for s in [(3, 4), (5, 4), (2, 4), (5, 2)])
    for fifo, ww in ((False, w), (True, np.ascontiguousarray(w.T))):
        f = lambda x, w0, fifo=fifo: lora_linear(  # noqa: E731
            x, w0, None, [(Tensor(a), Tensor(bb), 0.7)], fan_in_fan_out=fifo
        )
        assert gradcheck(f, [x, ww]).max_rel_error < 1e-6


def test_scaling_alpha_over_r_and_rslora():
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 16, use_rslora=True) == 4.0
    with pytest.raises(ValueError, match="r:"):
        lora_scaling(0, 8)


def _layer(kind="linear", d_in=6, d_out=5, dtype="float64"):
    with backend.dtype_policy(dtype):
        backend.seed(3)
        return LoraLayer(Linear(d_in, d_out) if kind == "linear" else Conv1D(d_in, d_out))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_default_init_is_identity_and_kaiming(kind):
    layer = _layer(kind)
    layer.add_adapter("default", r=4, lora_alpha=8)
    a = layer.lora_A["default"].weight.data
    assert np.all(layer.lora_B["default"].weight.data == 0)
    assert np.abs(a).max() <= 1 / math.sqrt(6) and np.abs(a).max() > 0.5 / math.sqrt(6)
    x = Tensor(np.random.default_rng(0).standard_normal((3, 6)))
    np.testing.assert_array_equal(layer(x).data, layer.base_layer(x).data)


def test_gaussian_init_std_is_one_over_r():
    layer = _layer(d_in=400, d_out=3)
    layer.add_adapter("g", r=4, lora_alpha=8, init_lora_weights="gaussian")
    assert abs(layer.lora_A["g"].weight.data.std() - 0.25) < 0.02


def test_first_step_gradients_differ_between_inits_errata_6():
    """B = 0 (paper, PEFT): ∂L/∂A = 0 and ∂L/∂B ≠ 0 at step one. A = 0 (lecture): the reverse."""
    x = Tensor(np.random.default_rng(0).standard_normal((4, 6)))
    layer = _layer()
    layer.add_adapter("paper", r=2, lora_alpha=2)
    layer.add_adapter("lecture", r=2, lora_alpha=2, init_lora_weights="lecture")
    grads = {}
    for name in ("paper", "lecture"):
        layer.set_adapter(name)
        layer.zero_grad()
        (layer(x) ** 2).sum().backward()
        grads[name] = (layer.lora_A[name].weight.grad, layer.lora_B[name].weight.grad)
    assert np.all(grads["paper"][0] == 0) and np.abs(grads["paper"][1]).max() > 1e-3
    assert np.all(grads["lecture"][1] == 0) and np.abs(grads["lecture"][0]).max() > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_olora_keep_the_weight_at_init(init, kind):
    layer = _layer(kind, d_in=7, d_out=5)
    w_before = layer._w0_out_in().copy()
    x = Tensor(np.random.default_rng(0).standard_normal((3, 7)))
    y_before = layer.base_layer(x).data.copy()
    layer.add_adapter("p", r=3, lora_alpha=6, init_lora_weights=init)
    a, b = layer.lora_A["p"].weight.data, layer.lora_B["p"].weight.data
    s = layer.scaling["p"]
    w_res = layer._w0_out_in()
    np.testing.assert_allclose(w_res + s * b @ a, w_before, atol=1e-12)  # W₀' + s·B·A = W₀
    assert np.abs(w_res - w_before).max() > 1e-2  # the principal part really moved
    np.testing.assert_allclose(layer(x).data, y_before, atol=1e-12)
    if init == "pissa":  # the residual has exactly the other singular values
        sv = np.linalg.svd(w_before, compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(w_res, compute_uv=False)[:2], sv[3:5], atol=1e-12)
    else:  # B = Q_r has orthonormal columns
        np.testing.assert_allclose(b.T @ b, np.eye(3), atol=1e-12)


def test_dropout_acts_on_the_lora_branch_only():
    layer = _layer()
    layer.add_adapter("d", r=2, lora_alpha=2, lora_dropout=0.5)  # B = 0
    x = Tensor(np.random.default_rng(0).standard_normal((8, 6)))
    layer.train()
    np.testing.assert_array_equal(layer(x).data, layer.base_layer(x).data)  # base untouched
    layer.lora_B["d"].weight.data[...] = 1.0
    y_train1, y_train2 = layer(x).data, layer(x).data
    layer.eval()
    y_eval = layer(x).data
    assert np.abs(y_train1 - y_train2).max() > 1e-6  # random masks in training
    np.testing.assert_array_equal(layer(x).data, y_eval)  # deterministic in eval
    # expectation over masks equals the eval output (inverted dropout), checked by averaging
    layer.train()
    backend.seed(0)
    mean = np.mean([layer(x).data for _ in range(400)], axis=0)
    assert np.abs(mean - y_eval).max() < 0.25 * np.abs(y_eval - layer.base_layer(x).data).max()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_roundtrip_float64(kind):
    layer = _layer(kind)
    layer.add_adapter("m", r=3, lora_alpha=5, init_lora_weights=False)
    w0 = layer.base_layer.weight.data.copy()
    x = Tensor(np.random.default_rng(0).standard_normal((4, 6)))
    y = layer(x).data
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(layer(x).data, y, atol=1e-12)
    layer.unmerge()
    assert np.abs(layer.base_layer.weight.data - w0).max() <= 1e-12
    np.testing.assert_allclose(layer(x).data, y, atol=1e-12)


def test_merge_float32_drift_is_small():
    layer = _layer(dtype="float32")
    layer.add_adapter("m", r=3, lora_alpha=5, init_lora_weights=False)
    w0 = layer.base_layer.weight.data.copy()
    layer.merge()
    layer.unmerge()
    drift = np.abs(layer.base_layer.weight.data - w0).max()
    assert drift <= 4 * np.finfo(np.float32).eps * (np.abs(w0).max() + 1)


def test_named_adapters_switch_disable_and_combine():
    layer = _layer()
    layer.add_adapter("a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.add_adapter("b", r=3, lora_alpha=3, init_lora_weights=False)
    x = Tensor(np.random.default_rng(0).standard_normal((4, 6)))
    base = layer.base_layer(x).data
    outs = {}
    for n in ("a", "b"):
        layer.set_adapter(n)
        outs[n] = layer(x).data
        assert layer.lora_A[n].weight.requires_grad
    assert not layer.lora_A["a"].weight.requires_grad  # inactive adapters are frozen
    layer.set_adapter(["a", "b"])
    np.testing.assert_allclose(layer(x).data - base, (outs["a"] - base) + (outs["b"] - base))
    with layer.disable_adapters():
        np.testing.assert_array_equal(layer(x).data, base)
    layer.delete_adapter("b")
    assert layer.active_adapters == ["a"]
    with pytest.raises(KeyError, match="no adapter"):
        layer.set_adapter("b")


def test_bad_inputs_raise_clear_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="r:"):
        layer.add_adapter("x", r=0, lora_alpha=1)
    with pytest.raises(ValueError, match="init_lora_weights"):
        layer.add_adapter("x", r=1, lora_alpha=1, init_lora_weights="nope")
    with pytest.raises(ValueError, match="PiSSA needs r"):
        layer.add_adapter("x", r=6, lora_alpha=1, init_lora_weights="pissa")
    layer.add_adapter("x", r=1, lora_alpha=1)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("x", r=1, lora_alpha=1)
    with pytest.raises(ValueError, match="in_features"):
        layer(Tensor(np.zeros((2, 5))))


@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_non_contiguous_inputs_give_the_same_result(d_in, d_out, seed):
    """Transposed / sliced views (as produced by reshapes upstream) change nothing."""
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, min(d_in, d_out) + 1))
    x_t = rng.standard_normal((d_in, 5)).T  # (5, in), a transposed view
    w_big = rng.standard_normal((d_out, 2 * d_in))[:, ::2]  # (out, in), strided
    a, b = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    g = rng.standard_normal((5, d_out))
    results = []
    for xx, ww in ((x_t, w_big), (np.ascontiguousarray(x_t), np.ascontiguousarray(w_big))):
        tx, ta, tb = (Tensor(v, requires_grad=True) for v in (xx, a, b))
        y = lora_linear(tx, Tensor(ww), None, [(ta, tb, 0.5)])
        y.backward(g)
        results.append((y.data, tx.grad, ta.grad, tb.grad))
    for u, v in zip(*results):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
