"""The QLoRA layer: a frozen 4-bit base dequantized on the fly, LoRA on top."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.nn import Embedding, Linear
from minipeft.nn.conv1d import Conv1D
from minipeft.peft import LoraConfig, LoraLayer, get_peft_model
from minipeft.quant.blockwise import dequantize_4bit, quantize_4bit
from minipeft.quant.qlora import (
    Linear4bit,
    Linear4bitFunction,
    QuantizedWeightError,
    Weight4bit,
    linear4bit,
    quantize_model,
)

CFG = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


def _w4(shape, seed=0, **kw):
    w = np.random.default_rng(seed).standard_normal(shape)
    packed, state = quantize_4bit(w, **kw)
    return Weight4bit(packed, state), w


@settings(max_examples=25)
@given(
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 12),
    fifo=st.booleans(),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    blocksize=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**16),
)
def test_forward_is_x_times_dequantized_weight(
    n_in, n_out, fifo, quant_type, double_quant, blocksize, seed
):
    shape = (n_in, n_out) if fifo else (n_out, n_in)
    w4, _ = _w4(shape, seed, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    rng = np.random.default_rng(seed + 1)
    x, b = rng.standard_normal((3, n_in)), rng.standard_normal(n_out)
    w_hat = dequantize_4bit(w4.packed, w4.quant_state).astype(np.float64)
    w_oi = w_hat.T if fifo else w_hat
    h = linear4bit(Tensor(x), w4, Tensor(b), fan_in_fan_out=fifo)
    np.testing.assert_allclose(h.data, x @ w_oi.T + b, rtol=1e-12, atol=1e-12)


@settings(max_examples=10)
@given(fifo=st.booleans(), double_quant=st.booleans(), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_grad_x_and_lora_grads_match_finite_differences(fifo, double_quant, quant_type):
    n_in, n_out, r = 9, 5, 2
    shape = (n_in, n_out) if fifo else (n_out, n_in)
    w4, _ = _w4(shape, 3, blocksize=32, quant_type=quant_type, double_quant=double_quant)
    rng = np.random.default_rng(4)
    x, b = rng.standard_normal((2, 3, n_in)), rng.standard_normal(n_out)
    a, bb = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))

    def f(xt, at, bt, biast):
        return linear4bit(xt, w4, biast, [(at, bt, 0.7)], fan_in_fan_out=fifo)

    assert gradcheck(f, [x, a, bb, b]).max_rel_error < 1e-6


def test_matches_a_lora_layer_over_the_dequantized_float_weight():
    """Reference: H7's LoraLayer on a float Linear whose weight is Ŵ (independent code)."""
    with backend.dtype_policy("float64"):
        backend.seed(0)
        lin = Linear(12, 7)
        q = Linear4bit.from_float(lin, blocksize=32)
        ref_base = Linear(12, 7)
        ref_base.weight.data[...] = q.dequantize()
        ref_base.bias.data[...] = lin.bias.data
        ql, rl = LoraLayer(q), LoraLayer(ref_base)
        for layer in (ql, rl):
            backend.seed(1)
            layer.add_adapter("a", r=3, lora_alpha=6, init_lora_weights=False)
    x = np.random.default_rng(2).standard_normal((4, 12))
    outs = []
    for layer in (ql, rl):
        xt = Tensor(x, requires_grad=True)
        y = layer(xt)
        y.backward(np.cos(np.arange(28.0)).reshape(4, 7))
        outs.append((y.data, xt.grad, layer.lora_A["a"].weight.grad, layer.lora_B["a"].weight.grad))
    for got, want in zip(*outs):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_backward_keeps_no_float_weight_and_redequantizes(monkeypatch):
    w4, _ = _w4((64, 48), blocksize=64)
    calls = []
    orig = Weight4bit.dequantize
    monkeypatch.setattr(
        Weight4bit, "dequantize", lambda self, dt=None: calls.append(1) or orig(self, dt)
    )
    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((4, 48)), requires_grad=True)
    b = Tensor(np.zeros((64, 4)), requires_grad=True)
    for x_needs_grad, backward_calls in ((True, 1), (False, 0)):
        calls.clear()
        x = Tensor(rng.standard_normal((5, 48)), requires_grad=x_needs_grad)
        y = linear4bit(x, w4, None, [(a, b, 1.0)])
        assert len(calls) == 1  # forward dequantizes once
        fn = y._ctx
        assert isinstance(fn, Linear4bitFunction)
        big = [k for k, v in vars(fn).items() if isinstance(v, np.ndarray) and v.size >= 64 * 48]
        assert big == []  # nothing as large as W is saved for backward
        y.sum().backward()
        assert len(calls) == 1 + backward_calls  # ∂L/∂X re-dequantizes, only when needed
        assert (x.grad is not None) == x_needs_grad
        assert w4.grad is None and b.grad is not None


def test_bytes_per_parameter_closed_form():
    n_out, n_in = 256, 128
    n = n_out * n_in
    w = np.random.default_rng(0).standard_normal((n_out, n_in)).astype(np.float32)
    plain = Linear4bit(w, blocksize=64)
    nested = Linear4bit(w, blocksize=64, double_quant=True)
    assert plain.bytes_per_param() == pytest.approx(0.5 + 4 / 64, abs=0)  # codes + fp32 absmax
    n_blocks = n // 64
    want = (n / 2 + n_blocks + 4 * -(-n_blocks // 256) + 4) / n  # codes, u8 absmax, fp32 c₂, μ
    assert nested.bytes_per_param() == pytest.approx(want, abs=0)
    assert 0.5 < nested.bytes_per_param() < plain.bytes_per_param() < 0.57
    assert plain.weight.nbytes < w.nbytes / 7  # vs 4 bytes per float32 parameter


def test_quantize_model_gpt2_close_to_float_and_lora_trains():
    from minipeft.optim import AdamW

    backend.seed(0)
    model = GPT2(CFG)
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))
    ref = model(ids).data.copy()
    loss_float = float(model.loss(ids).data)
    names = quantize_model(model, ["c_attn", "c_proj", "c_fc"], double_quant=True)
    assert len(names) == 4 * CFG.n_layer
    assert all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    assert [n for n, _ in model.transformer.h[0].attn.children()][:2] == ["c_attn", "c_proj"]
    loss_q = float(model.loss(ids).data)
    assert abs(loss_q - loss_float) < 0.05 * loss_float
    assert np.abs(model(ids).data - ref).max() > 0  # quantization changed the logits
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True))  # fmt: skip
    np.testing.assert_array_equal(pm(ids).data, model(ids).data)  # B = 0: QLoRA = 4-bit base
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, _ in trainable)
    opt = AdamW([p for _, p in trainable], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(ids)
        pm.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]
    assert float(model.loss(ids).data) < loss_q


def test_merge_pissa_dora_are_refused_without_changing_the_layer():
    backend.seed(0)
    layer = LoraLayer(Linear4bit.from_float(Conv1D(16, 8)))
    assert layer.fan_in_fan_out
    layer.add_adapter("a", r=2, lora_alpha=4)
    packed = layer.base_layer.weight.packed.copy()
    with pytest.raises(QuantizedWeightError, match="lossy"):
        layer.merge()
    for kw in ({"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}, {"use_dora": True}):
        with pytest.raises(QuantizedWeightError, match="no dense float"):
            layer.add_adapter("b", r=2, lora_alpha=4, **kw)
        assert sorted(layer.r) == ["a"]
    assert not layer.merged
    np.testing.assert_array_equal(layer.base_layer.weight.packed, packed)


def test_other_adapters_refuse_a_4bit_base_clearly():
    from minipeft.peft import IA3Layer

    with pytest.raises(TypeError, match="LoRA adapters only"):
        IA3Layer(Linear4bit.from_float(Linear(8, 4)), "a", is_feedforward=False)


def test_bad_input():
    w4, _ = _w4((4, 6))
    with pytest.raises(ValueError, match="packed"):
        Weight4bit(w4.packed[:-1], w4.quant_state)
    with pytest.raises(ValueError, match="x: expected last dimension 6"):
        linear4bit(Tensor(np.ones((2, 5))), w4)
    with pytest.raises(ValueError, match="bias"):
        linear4bit(Tensor(np.ones((2, 6))), w4, Tensor(np.ones(3)))
    with pytest.raises(TypeError, match="Linear or Conv1D"):
        Linear4bit.from_float(Embedding(5, 4))
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit(np.ones(8))
    backend.seed(0)
    model = GPT2(CFG)
    with pytest.raises(ValueError, match="only Linear and Conv1D"):
        quantize_model(model, ["wte"])
    with pytest.raises(ValueError, match="matched no module"):
        quantize_model(model, ["nothing_here"])


def test_forward_matches_bitsandbytes_matmul_4bit():
    torch = pytest.importorskip("torch", reason="cross-check needs PyTorch")
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes")
    w = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    packed_t, state_t = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    w_bnb = bnb_f.dequantize_4bit(packed_t, state_t).numpy()
    ours = Linear4bit(w, blocksize=64)
    np.testing.assert_array_equal(ours.dequantize(), w_bnb)
    y_torch = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w_bnb)).numpy()
    np.testing.assert_allclose(ours(Tensor(x)).data, y_torch, rtol=1e-5, atol=1e-5)


def test_qlora_matches_hf_peft_on_a_bitsandbytes_linear4bit():
    """Peer check: HF PEFT's LoRA over bitsandbytes' Linear4bit (CPU) — output and gradients."""
    torch = pytest.importorskip("torch", reason="cross-check needs PyTorch")
    bnb = pytest.importorskip("bitsandbytes", reason="cross-check needs bitsandbytes")
    peft = pytest.importorskip("peft", reason="cross-check needs HF PEFT")
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize

    rng = np.random.default_rng(0)
    w = (0.1 * rng.standard_normal((24, 40))).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    a = rng.standard_normal((4, 40)).astype(np.float32)
    bm = rng.standard_normal((24, 4)).astype(np.float32)
    x = rng.standard_normal((3, 40)).astype(np.float32)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = bnb.nn.Linear4bit(
                40, 24, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False
            )

        def forward(self, x):
            return self.lin(x)

    net = Net()
    net.lin.weight = bnb.nn.Params4bit(
        torch.from_numpy(w), requires_grad=False, quant_type="nf4", blocksize=64,
        compress_statistics=False,
    ).to("cpu")  # fmt: skip
    net.lin.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False)
    pm = peft.get_peft_model(net, cfg)
    lin = pm.base_model.model.lin
    with torch.no_grad():
        lin.lora_A.default.weight.copy_(torch.from_numpy(a))
        lin.lora_B.default.weight.copy_(torch.from_numpy(bm))
    xt = torch.from_numpy(x).requires_grad_(True)
    g = np.cos(np.arange(72.0)).reshape(3, 24).astype(np.float32)
    y = pm(xt)
    y.backward(torch.from_numpy(g))

    ours = LoraLayer(Linear4bit(w, bias, blocksize=64, quant_type="nf4"))
    ours.add_adapter("default", r=4, lora_alpha=8)
    ours.lora_A["default"].weight.data[...] = a
    ours.lora_B["default"].weight.data[...] = bm
    bnb_w = bnb_dequantize(lin.base_layer.weight.data, lin.base_layer.weight.quant_state)
    np.testing.assert_array_equal(ours.base_layer.dequantize(), bnb_w.numpy())  # same Ŵ
    xo = Tensor(x, requires_grad=True)
    yo = ours(xo)
    yo.backward(g)
    np.testing.assert_allclose(yo.data, y.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    for ours_p, theirs in ((ours.lora_A, lin.lora_A), (ours.lora_B, lin.lora_B)):
        np.testing.assert_allclose(
            ours_p["default"].weight.grad, theirs.default.weight.grad.numpy(), rtol=1e-4, atol=1e-4
        )


def test_saved_adapter_loads_onto_a_quantized_model(tmp_path):
    """save_pretrained on a QLoRA model, from_pretrained onto a freshly quantized base."""
    from minipeft.autograd.tensor import no_grad
    from minipeft.models.gpt2 import GPT2, GPT2Config
    from minipeft.peft import LoraConfig, PeftModel, get_peft_model
    from minipeft.quant.qlora import quantize_model

    def base():
        backend.seed(3)
        m = GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=40, n_positions=16))
        quantize_model(m, ["c_attn", "c_fc"], quant_type="nf4", blocksize=64)
        return m.eval()

    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                              init_lora_weights=False))  # fmt: skip
    ids = np.array([[1, 2, 3, 4, 5]])
    with no_grad():
        want = model(ids).data
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(base(), str(tmp_path))
    with no_grad():
        np.testing.assert_array_equal(loaded(ids).data, want)
