"""LoftQ: alternate 4-bit quantization and a rank-r SVD of the residual."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.quant.blockwise import dequantize_4bit, quantize_4bit
from minipeft.quant.loftq import loftq_init, loftq_model, lowrank_svd
from minipeft.quant.qlora import Linear4bit, quantize_model

CFG = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


@settings(max_examples=30)
@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data(), scale=st.floats(0.1, 8.0))
def test_svd_step_is_the_eckart_young_optimum(m, n, data, scale):
    r = data.draw(st.integers(1, min(m, n)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    res = rng.standard_normal((m, n))
    a, b = lowrank_svd(res, r, scale)
    assert a.shape == (r, n) and b.shape == (m, r)
    approx = scale * (b @ a)
    sv = np.linalg.svd(res, compute_uv=False)
    # Eckart–Young–Mirsky: the error is the tail of the spectrum
    np.testing.assert_allclose(np.sum((res - approx) ** 2), np.sum(sv[r:] ** 2), atol=1e-10)
    # no random rank-r matrix does better
    other = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    assert np.sum((res - other) ** 2) >= np.sum((res - approx) ** 2) - 1e-10
    # singular values split evenly: BᵀB = AAᵀ = diag(σ_r / s)
    np.testing.assert_allclose(b.T @ b, np.diag(sv[:r] / scale), atol=1e-10)
    np.testing.assert_allclose(a @ a.T, np.diag(sv[:r] / scale), atol=1e-10)


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("dist", ["gauss", "student_t3"])
def test_loftq_error_decreases_from_the_qlora_init(fifo, dist):
    rng = np.random.default_rng(0)
    shape = (24, 40)
    w = rng.standard_normal(shape) if dist == "gauss" else rng.standard_t(3, shape)
    w = (0.02 * w).astype(np.float32)
    s = 2.0
    res = loftq_init(w, 4, s, num_iter=4, fan_in_fan_out=fifo, blocksize=64)
    # t = 0 is plain QLoRA: ‖W − Q(W)‖ with Q from quantize_4bit itself, B = 0
    stored = w.T if fifo else w
    q0 = dequantize_4bit(*quantize_4bit(np.ascontiguousarray(stored), blocksize=64))
    q0 = (q0.T if fifo else q0).astype(np.float64)
    np.testing.assert_allclose(res.errors[0], np.linalg.norm(w - q0), rtol=1e-12)
    e = np.array(res.errors)
    assert len(e) == 5 and e[1] <= e[0]  # one round beats plain QLoRA (Eckart–Young)
    assert e[-1] < 0.9 * e[0]  # measured on this matrix (full rounds are not guaranteed)
    # the SVD half-step never raises the error
    assert np.all(e[1:] <= np.array(res.errors_after_quant) + 1e-12)
    # the returned state stores Q in the layer's layout and reproduces the last error
    assert res.state.shape == stored.shape
    q = dequantize_4bit(res.packed, res.state).astype(np.float64)
    q = q.T if fifo else q
    final = np.linalg.norm(w - q - s * (res.B.astype(np.float64) @ res.A.astype(np.float64)))
    np.testing.assert_allclose(final, e[-1], rtol=1e-5)  # A, B are float32 like W
    assert res.A.dtype == np.float32 and res.A.shape == (4, 40) and res.B.shape == (24, 4)


def test_a_full_round_can_raise_the_error():
    """The quantization half-step is not a minimizer: E_t is not monotone in general."""
    w = (0.02 * np.random.default_rng(7).standard_t(3, (16, 64))).astype(np.float32)
    res = loftq_init(w, 2, 2.0, num_iter=8)
    e = np.array(res.errors)
    assert np.all(e[1:] <= np.array(res.errors_after_quant) * (1 + 1e-12))  # SVD half-step
    assert e[1] <= e[0]
    assert np.any(np.diff(e) > 0)


def test_one_iteration_is_qlora_plus_the_svd_of_its_residual():
    w = np.random.default_rng(1).standard_normal((16, 32))
    res = loftq_init(w, 3, 1.5, num_iter=1)
    q = dequantize_4bit(*quantize_4bit(w)).astype(np.float64)
    sv = np.linalg.svd(w - q, compute_uv=False)
    np.testing.assert_allclose(res.errors[1], np.sqrt(np.sum(sv[3:] ** 2)), rtol=1e-10)


def test_loftq_model_starts_closer_to_the_float_model_than_qlora():
    backend.seed(0)
    ref = GPT2(CFG)
    state = {k: v.copy() for k, v in ref.state_dict().items()}
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))
    logits = ref(ids).data
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)

    def fresh():
        m = GPT2(CFG)
        m.load_state_dict(state)
        return m

    plain = fresh()
    quantize_model(plain, ["c_attn", "c_fc"])
    pm_plain = get_peft_model(plain, cfg)
    lq = fresh()
    pm_lq = loftq_model(lq, cfg, num_iter=3)
    layer = lq.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Linear4bit)
    assert np.abs(layer.lora_B["default"].weight.data).max() > 0  # not the B = 0 init
    err_plain = np.abs(pm_plain(ids).data - logits).max()
    err_lq = np.abs(pm_lq(ids).data - logits).max()
    assert err_lq < err_plain
    trainable = [n for n, p in pm_lq.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_bad_input():
    w = np.ones((4, 6))
    with pytest.raises(ValueError, match="r: expected"):
        lowrank_svd(w, 5)
    with pytest.raises(ValueError, match="scale"):
        lowrank_svd(w, 2, 0.0)
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(w, 2, num_iter=0)
    with pytest.raises(ValueError, match="w: expected a 2-D float"):
        loftq_init(np.ones(6), 2)
    with pytest.raises(TypeError, match="LoraConfig"):
        loftq_model(GPT2(CFG), {"r": 2})
