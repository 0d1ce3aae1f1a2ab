"""The device path, proven without a GPU: every model, adapter and optimizer on the strict
CuPy stand-in (``tests/standin``) equals the NumPy backend, stays on the device, and the
training step makes no host round trip.

Each test runs on ``device.BACKENDS`` minus NumPy: the stand-in everywhere, and the real
CuPy where a GPU is present (``python -m minipeft gpu-check``). Results are compared with
the NumPy backend in float64: ≤ 1e-12 relative (the stand-in computes with NumPy, so a
difference means a code path that computes differently on the device).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from device import BACKENDS, host, on_backend, on_device

import minipeft
from minipeft import backend
from minipeft.autograd import Tensor, ops
from minipeft.models import GPT2, GPT2Config
from minipeft.nn import Linear
from minipeft.optim import SGD, AdamW
from minipeft.peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuning,
    PromptTuning,
    PTuningV2,
    VeraConfig,
    get_peft_model,
)

DEVICES = [b for b in BACKENDS if b != "numpy"]
TINY = dict(
    vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=4, bos_token_id=0,
    eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
)  # fmt: skip
IDS = np.random.default_rng(0).integers(0, 61, size=(2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
RTOL = 1e-12


def _stats(xp: Any) -> dict[str, int] | None:
    """The stand-in's refusal and transfer counts (None on the real CuPy)."""
    return xp.stats() if hasattr(xp, "stats") else None


def _assert_all_on_device(model: Any) -> None:
    for name, p in model.named_parameters():
        assert on_device(p.data), f"{name} lives on the host"
        assert p.grad is None or on_device(p.grad), f"{name}.grad lives on the host"
    for name, arr in model.state_dict().items():
        assert on_device(arr), f"state {name} lives on the host"


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=RTOL, atol=1e-14, err_msg=k)


# ---------------------------------------------------------------------------- placement
@pytest.mark.parametrize("where", DEVICES)
def test_new_modules_and_tensors_live_on_the_current_backend(where):
    with on_backend(where) as xp:
        minipeft.seed(0)
        layer = Linear(4, 3)
        assert on_device(layer.weight.data) and on_device(layer.bias.data)
        assert on_device(minipeft.tensor(np.ones(3)).data)  # host data, moved by the factory
        assert on_device(minipeft.tensor([1.0, 2.0]).data)
        assert layer.placement() == "cupy"
        w_dev = host(layer.weight.data)
        assert _stats(xp) is None or _stats(xp)["refused"] == 0
    minipeft.seed(0)
    # initialisation is drawn from the one seeded host generator: the same weights
    np.testing.assert_array_equal(Linear(4, 3).weight.data, w_dev)


@pytest.mark.parametrize("where", DEVICES)
def test_module_to_moves_parameters_gradients_and_buffers_both_ways(where):
    with on_backend(where):
        minipeft.seed(0)
        model = GPT2(GPT2Config(**TINY))
        model.transformer.h[0].register_buffer("extra", np.arange(3.0))
        model.loss(IDS).backward()
        before = {k: host(v) for k, v in model.state_dict().items()}
        grads = {n: host(p.grad) for n, p in model.named_parameters()}
        model.to("numpy")
        assert model.placement() == "numpy"
        for name, p in model.named_parameters():
            assert isinstance(p.data, np.ndarray) and isinstance(p.grad, np.ndarray), name
            np.testing.assert_array_equal(p.grad, grads[name])
        assert isinstance(model.transformer.h[0].extra, np.ndarray)
        _close(before, dict(model.state_dict()))
        model.to("cupy")
        _assert_all_on_device(model)
        # tied weights stay tied: the head is still the embedding after two moves
        assert model.lm_head_weight is model.transformer.wte.weight
        with pytest.raises(ValueError, match="device: expected 'numpy' or 'cupy', got 'tpu'"):
            model.to("tpu")


@pytest.mark.parametrize("where", DEVICES)
def test_mixing_host_and_device_names_both_placements(where):
    with on_backend(where):
        minipeft.seed(0)
        layer = Linear(4, 3)
        x_host = Tensor(np.ones((2, 4), dtype=np.float32), requires_grad=True).to("numpy")
        assert on_device(minipeft.tensor(np.ones(2)).data)  # created on the current backend
        assert not on_device(Tensor(np.ones(2)).data)  # an existing array is wrapped in place
        assert not on_device((Tensor(np.ones(2)) * 2).data)  # numbers follow their tensor
        g = ops.tanh(Tensor(np.ones(3), requires_grad=True))
        g.backward(np.ones(3))  # a host cotangent for a host output
        with pytest.raises(backend.PlacementError, match=r"numpy \(host\).*cupy \(device\)"):
            layer(x_host)
        with pytest.raises(backend.PlacementError, match=r"constant: a numpy array of shape"):
            ops.add(layer.weight, np.ones((3, 4), dtype=np.float32))
        with pytest.raises(backend.PlacementError, match="constant: a numpy array"):
            ops.add(layer.weight, np.ones((3, 4), dtype=np.int64))
        with pytest.raises(backend.PlacementError, match="ids: live on numpy"):
            ops.embedding(layer.weight, np.array([0, 1]))
        host_model = GPT2(GPT2Config(**TINY)).to("numpy")
        with pytest.raises(backend.PlacementError):
            ops.add(host_model.lm_head_weight, Tensor(backend.to_device(np.ones((61, 16)))))
        with pytest.raises(backend.PlacementError, match="rng: a NumPy generator"):
            ops.dropout(layer.weight, 0.5, rng=np.random.default_rng(0))


@pytest.mark.parametrize("where", DEVICES)
def test_dropout_masks_are_drawn_on_the_device_reproducibly(where):
    with on_backend(where) as xp:
        x = Tensor(backend.to_device(np.ones((64, 64))))
        minipeft.seed(3)
        a = ops.dropout(x, 0.5)
        minipeft.seed(3)
        b = ops.dropout(x, 0.5)
        assert on_device(a.data)
        np.testing.assert_array_equal(host(a.data), host(b.data))
        kept = float(host(a.data).astype(bool).mean())
        assert 0.4 < kept < 0.6
        s = _stats(xp)
        assert s is None or (s["refused"] == 0)


# ---------------------------------------------------------------------------- training
def _lora():
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
    )


def _dora():
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True
    )


def _vera():
    return VeraConfig(
        r=8, target_modules=["c_attn", "c_fc"], save_projection=True, fan_in_fan_out=True
    )


def _ia3():
    return IA3Config(
        target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True
    )


def _adalora():
    return AdaLoraConfig(
        target_modules=["c_attn"], init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1,
        total_step=5, lora_alpha=8,
    )  # fmt: skip


METHODS: dict[str, Callable[[], Any]] = {
    "full": lambda: None,
    "lora": _lora,
    "dora": _dora,
    "vera": _vera,
    "ia3": _ia3,
    "adalora": _adalora,
}


def _train(where: str, method: str, steps: int = 5) -> dict[str, Any]:
    """A few AdamW steps of GPT-2 (+ the method's adapter) on ``where``; host results."""
    with on_backend(where) as xp:
        minipeft.seed(0)
        with minipeft.dtype_policy("float64"):
            model = GPT2(GPT2Config(**TINY))
            cfg = METHODS[method]()
            if cfg is not None:
                model = get_peft_model(model, cfg)
                if method == "lora":  # B starts at 0: give it values so every path is live
                    for name, p in model.named_parameters():
                        if "lora_B" in name:
                            p.data[...] = backend.to_device(
                                np.random.default_rng(1).standard_normal(p.shape) * 0.1
                            )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW(params, lr=1e-2, weight_decay=0.01)
        allocator = getattr(model, "rankallocator", None)
        losses, per_step = [], []
        for step in range(steps):
            # the stand-in counts transfers; the real CuPy has nothing to count
            with xp.counting() if hasattr(xp, "counting") else contextlib.nullcontext() as c:
                loss = model.loss(IDS, attention_mask=MASK)
                loss.backward()
                opt.step()
                if allocator is not None:
                    allocator.update_and_allocate(step)
                opt.zero_grad()
                if c is not None:
                    per_step.append(dict(c))
            losses.append(loss)
        if where != "numpy":
            _assert_all_on_device(model)
            for st in opt.state.values():
                for v in st.values():
                    assert not hasattr(v, "shape") or on_device(v), "optimizer state on the host"
        return {
            "losses": [float(host(x.data)) for x in losses],
            "state": {k: host(v) for k, v in model.state_dict().items()},
            "per_step": per_step,
            "stats": _stats(xp),
        }


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_training_step_equals_numpy_and_stays_on_the_device(method, where):
    ref = _train("numpy", method)
    dev = _train(where, method)
    np.testing.assert_allclose(dev["losses"], ref["losses"], rtol=RTOL)
    _close(ref["state"], dev["state"])
    if dev["stats"] is not None:  # the stand-in counts
        assert dev["stats"]["refused"] == 0
        for step, c in enumerate(dev["per_step"]):
            # the step's only transfers: ids, mask and labels moved once at the entry
            assert c.get("refused", 0) == 0
            assert c.get("h2d", 0) <= 3, (step, c)
            # none back to the host, except AdaLoRA's rank pattern (a list of booleans per
            # adapted matrix, as HF PEFT's .tolist()) at its allocation steps
            allowed = TINY["n_layer"] if method == "adalora" else 0
            assert c.get("d2h", 0) <= allowed, (step, c)


@pytest.mark.parametrize("where", DEVICES)
def test_sgd_and_adamw_follow_their_parameters_to_the_device(where):
    with on_backend(where):
        minipeft.seed(0)
        with minipeft.dtype_policy("float64"):
            layer = Linear(5, 3).to("numpy")
        x = np.random.default_rng(0).standard_normal((4, 5))
        results = {}
        for cls in (SGD, AdamW):
            kw = {"momentum": 0.9} if cls is SGD else {}
            minipeft.seed(0)
            with minipeft.dtype_policy("float64"):
                layer = Linear(5, 3).to("numpy")
            opt = cls(list(layer.parameters()), lr=0.1, **kw)
            out = []
            for step in range(4):
                if step == 2:  # the model moves mid-training; the optimizer's state follows
                    layer.to("cupy")
                xin = Tensor(backend.to_device(x, layer.weight.placement()))
                (layer(xin) ** 2).sum().backward()
                opt.step()
                opt.zero_grad()
                out.append(host(layer.weight.data))
            for st in opt.state.values():
                for v in st.values():
                    assert not hasattr(v, "shape") or on_device(v)
            results[cls.__name__] = out
    for cls in (SGD, AdamW):
        minipeft.seed(0)
        with minipeft.dtype_policy("float64"):
            layer = Linear(5, 3)
        opt = cls(list(layer.parameters()), lr=0.1, **({"momentum": 0.9} if cls is SGD else {}))
        for step in range(4):
            (layer(Tensor(x)) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
            np.testing.assert_allclose(results[cls.__name__][step], layer.weight.data, rtol=RTOL)


# ---------------------------------------------------------------------------- files
def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("method", ["lora", "vera", "ia3", "adalora"])
def test_saving_from_the_device_writes_the_host_bytes_and_loads_back_on_the_device(
    method, where, tmp_path
):
    from minipeft.peft import PeftModel

    def build():
        minipeft.seed(0)
        base = GPT2(GPT2Config(**TINY))
        model = get_peft_model(base, METHODS[method]())
        for name, p in model.named_parameters():
            if p.requires_grad:
                rng = np.random.default_rng(abs(hash(name)) % 2**32)
                p.data[...] = backend.to_device(rng.standard_normal(p.shape).astype(p.dtype))
        return model

    build().save_pretrained(tmp_path / "host")
    with on_backend(where):
        model = build()
        model.save_pretrained(tmp_path / "device")
        logits = host(model.eval()(IDS).data)
        minipeft.seed(0)
        loaded = PeftModel.from_pretrained(GPT2(GPT2Config(**TINY)), tmp_path / "device")
        _assert_all_on_device(loaded)
        np.testing.assert_allclose(host(loaded.eval()(IDS).data), logits, rtol=1e-6, atol=1e-7)
    assert _digest(tmp_path / "host") == _digest(tmp_path / "device")


@pytest.mark.parametrize("where", DEVICES)
def test_checkpoints_load_onto_the_device_and_save_the_host_bytes(where, tmp_path):
    minipeft.seed(0)
    GPT2(GPT2Config(**TINY)).save_pretrained(tmp_path / "host")
    with on_backend(where):
        model = GPT2.from_pretrained(tmp_path / "host")
        _assert_all_on_device(model)
        model.save_pretrained(tmp_path / "device")
    assert _digest(tmp_path / "host") == _digest(tmp_path / "device")


# ---------------------------------------------------------------------------- more models
def _same_on_device(where: str, build: Callable[[], Any], run: Callable[[Any], Any]) -> None:
    """Build and run (forward + backward) on NumPy and on ``where``: equal outputs and
    gradients (float64, ≤ 1e-12 relative), everything on the device, nothing refused."""

    def go(name: str) -> tuple[Any, dict[str, np.ndarray], dict[str, int] | None]:
        with on_backend(name) as xp:
            minipeft.seed(0)
            with minipeft.dtype_policy("float64"):
                model = build()
            out = run(model)
            out.sum().backward() if out.size > 1 else out.backward()
            if name != "numpy":
                assert on_device(out.data)
                _assert_all_on_device(model)
            grads = {n: host(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            return host(out.data), grads, _stats(xp)

    ref_out, ref_grads, _ = go("numpy")
    out, grads, stats = go(where)
    assert ref_grads, "no parameter received a gradient"
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=1e-14)
    _close(ref_grads, grads)
    assert stats is None or stats["refused"] == 0


BERT_TINY = dict(
    vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
    intermediate_size=20, max_position_embeddings=16, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip
BIDS = np.array([[1, 4, 9, 2], [3, 3, 7, 0]])
BMASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])


def _bert():
    from minipeft.models import BertConfig, BertModel

    return BertModel(BertConfig(**BERT_TINY), add_pooling_layer=False)


@pytest.mark.parametrize("where", DEVICES)
def test_bert_sentence_embeddings_equal_numpy(where):
    from minipeft.models.bert import l2_normalize, mean_pool

    def run(model):
        types = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
        return l2_normalize(mean_pool(model(BIDS, BMASK, types), BMASK))

    _same_on_device(where, _bert, run)


@pytest.mark.parametrize("where", DEVICES)
def test_attention_with_prefixes_and_masks_equals_numpy(where):
    from minipeft.nn.attention import scaled_dot_product_attention

    class Holder(minipeft.nn.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            for name, shape in (("q", (2, 3, 4, 5)), ("k", (1, 3, 6, 5)), ("v", (2, 3, 6, 5))):
                setattr(self, name, minipeft.nn.Parameter(rng.standard_normal(shape)))

    def run(m):
        keep = np.ones((2, 1, 4, 6), dtype=bool)
        keep[1, :, :, 4:] = False  # padding keys of the second example
        keep[0, :, 2, :] = False  # a query row with no visible key (gives 0, no NaN)
        mask = backend.to_device(keep)
        return scaled_dot_product_attention(m.q, m.k, m.v, causal=True, attn_mask=mask)

    _same_on_device(where, Holder, run)


PROMPTS = {
    "prompt": lambda m: PromptTuning(m, 3, std=0.5),
    "prefix": lambda m: PrefixTuning(m, 3, reparam_hidden=5),
    "ptuning_v2": lambda m: PTuningV2(m, 3, std=0.5),
}


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("method", list(PROMPTS))
def test_prompt_methods_equal_numpy(method, arch, where):
    from minipeft.peft import PromptedModel

    def build():
        base = GPT2(GPT2Config(**TINY)) if arch == "gpt2" else _bert()
        return PromptedModel(base, PROMPTS[method](base))

    def run(pm):
        if arch == "gpt2":
            return pm.loss(IDS, attention_mask=MASK)
        return pm(BIDS, BMASK)

    _same_on_device(where, build, run)


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_bottleneck_adapters_equal_numpy(kind, arch, where):
    from minipeft.peft import add_adapters

    def build():
        base = GPT2(GPT2Config(**TINY)) if arch == "gpt2" else _bert()
        add_adapters(base, kind, 4, init="houlsby")
        return base

    def run(model):
        return model.loss(IDS) if arch == "gpt2" else model(BIDS, BMASK)

    _same_on_device(where, build, run)


@pytest.mark.parametrize("where", DEVICES)
def test_diffusion_denoiser_loss_equals_numpy(where):
    from minipeft.diffusion import Denoiser, DiffusionConfig, NoiseSchedule, diffusion_loss

    cfg = DiffusionConfig(hidden=16, mlp_hidden=24, n_blocks=2, time_dim=8, T=20)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((3, 64)), rng.standard_normal((3, 64))
    t, tokens = np.array([1, 7, 19]), np.array([2, 5, 11])

    def run(model):
        return diffusion_loss(model, NoiseSchedule(cfg.T, cfg.schedule), x0, tokens, t, eps)

    _same_on_device(where, lambda: Denoiser(cfg), run)


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "cuda"])
def test_qlora_trains_on_the_device_equal_to_numpy(impl, where):
    """QLoRA: NF4 + double-quantized base on the device, LoRA on top; the device
    dequantizes with the array-namespace reference or with the CUDA kernel (on the stand-in:
    the kernel executed under the CPU emulation of the CUDA built-ins)."""
    from minipeft.quant.qlora import Linear4bit, quantize_model

    if impl == "cuda":
        pytest.importorskip("minipeft.kernels.cuda.emulate", reason="CUDA emulation not built")

    def build():
        model = GPT2(GPT2Config(**TINY))
        quantize_model(model, ["c_attn", "c_fc"], double_quant=True)
        for _, mod in model.named_modules():
            if isinstance(mod, Linear4bit):
                mod.weight.impl = impl if backend.get_backend() == "cupy" else "numba"
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                         fan_in_fan_out=True, init_lora_weights=False)  # fmt: skip
        model = get_peft_model(model, cfg)
        for _, mod in model.named_modules():
            if isinstance(mod, Linear4bit):
                assert mod.weight.placement() == backend.get_backend()
        return model

    def run(model):
        return model.loss(IDS, attention_mask=MASK)

    _same_on_device(where, build, run)


@pytest.mark.parametrize("where", DEVICES)
def test_optimizer_state_saves_the_host_bytes_and_resumes_on_the_device(where, tmp_path):
    from minipeft.optim.io import load_state, save_state

    def trained(name: str, path: Path) -> tuple[Any, Any]:
        with on_backend(name):
            minipeft.seed(0)
            with minipeft.dtype_policy("float64"):
                model = GPT2(GPT2Config(**TINY))
            opt = AdamW(list(model.parameters()), lr=1e-2)
            for _ in range(2):
                model.loss(IDS).backward()
                opt.step()
                opt.zero_grad()
            save_state(path, opt)
            resumed = AdamW(list(model.parameters()), lr=1e-2)
            load_state(path, resumed)
            if name != "numpy":
                for st in resumed.state.values():
                    for v in st.values():
                        assert not hasattr(v, "shape") or on_device(v)
            model.loss(IDS).backward()
            resumed.step()
            return {k: host(v) for k, v in model.state_dict().items()}, path.read_bytes()

    ref_state, ref_bytes = trained("numpy", tmp_path / "host.safetensors")
    state, raw = trained(where, tmp_path / "device.safetensors")
    assert raw == ref_bytes
    _close(ref_state, state)
