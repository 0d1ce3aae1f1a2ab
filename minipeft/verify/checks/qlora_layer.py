"""Registered checks for the QLoRA layer and LoftQ (derivations/qlora_layer.md).

References, none computed by the code under test: Ŵ rebuilt here from the packed bytes by
hand (high nibble first) with the NF4 table printed in the QLoRA paper; float64 central
differences (``gradcheck``); the Eckart–Young tail Σ_{i>r} σᵢ² from the eigenvalues of RᵀR
(``eigvalsh``, a different LAPACK route from the SVD under test); LoftQ's final error
recomputed from the returned codes, A and B. Small shapes: each check runs in milliseconds.
"""

from __future__ import annotations

import numpy as np

from ...autograd.gradcheck import gradcheck
from ...autograd.tensor import Tensor
from ...peft.qlora import linear4bit
from ...quant.blockwise import quantize_4bit
from ...quant.loftq import loftq_init, lowrank_svd
from ...quant.qlora import Weight4bit
from .. import Outcome, equation

# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 values as printed there.
_PAPER_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)  # fmt: skip


def _hand_dequant(packed: np.ndarray, absmax: np.ndarray, shape, blocksize: int) -> np.ndarray:
    """Ŵ by hand: two codes per byte (high nibble first), NF4 paper table × block absmax."""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        byte = int(packed[i // 2])
        code = byte >> 4 if i % 2 == 0 else byte & 0x0F
        out[i] = _PAPER_NF4[code] * np.float32(absmax[i // blocksize])  # float32 product
    return out.reshape(shape)


def _example(seed: int, fan_in_fan_out: bool) -> tuple:
    rng = np.random.default_rng(seed)
    n_in, n_out, r = 20, 6, 3
    w = rng.standard_normal((n_in, n_out) if fan_in_fan_out else (n_out, n_in))  # stored layout
    packed, state = quantize_4bit(w, blocksize=32, quant_type="nf4")  # 120 items: 3 blocks + tail
    w4 = Weight4bit(packed, state)
    x = rng.standard_normal((2, 3, n_in))
    b = rng.standard_normal(n_out)
    a, bb = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    return w4, w, x, b, a, bb


@equation(
    "qlora.linear4bit_forward",
    what="H = X·Ŵᵀ + b + s·(X·Aᵀ)·Bᵀ, Ŵ = NF4[q]·c_b rebuilt by hand from the packed bytes",
    derivation="qlora_layer.md",
    implements=linear4bit,
    tol=1e-14,
)
def _check_forward() -> Outcome:
    err, arrays = 0.0, {}
    for fifo in (False, True):
        w4, _, x, b, a, bb = _example(1, fifo)
        st = w4.quant_state
        w_hat = _hand_dequant(w4.packed, st.absmax, st.shape, st.blocksize).astype(np.float64)
        w_oi = w_hat.T if fifo else w_hat  # (out, in)
        for adapters in ([], [(a, bb, 0.5)]):
            ref = x @ w_oi.T + b  # X·Ŵᵀ + b
            if adapters:
                ref = ref + 0.5 * (x @ a.T) @ bb.T  # + s·(X·Aᵀ)·Bᵀ
            ads = [(Tensor(p), Tensor(q), s) for p, q, s in adapters]
            h = linear4bit(Tensor(x), w4, Tensor(b), ads, fan_in_fan_out=fifo).data
            err = max(err, float(np.max(np.abs(h - ref)) / np.max(np.abs(ref))))
        if not fifo:
            arrays = {"x": x, "w_hat": w_hat, "bias": b, "A": a, "B": bb, "h": h}
    return Outcome(err, arrays, "Linear and Conv1D layouts, with and without an adapter")


@equation(
    "qlora.linear4bit_grad_x",
    what="∂L/∂X = G·Ŵ + s·(G·B)·A through the 4-bit base, vs float64 central differences",
    derivation="qlora_layer.md",
    implements=linear4bit,
    tol=1e-6,
)
def _check_grad_x() -> Outcome:
    err, arrays = 0.0, {}
    for fifo in (False, True):
        w4, _, x, b, a, bb = _example(2, fifo)
        rng = np.random.default_rng(3)
        mask = (rng.random(x.shape) >= 0.25) / 0.75  # a dropout multiplier M/(1−p)

        def f(xt, w4=w4, b=b, a=a, bb=bb, mask=mask, fifo=fifo):
            ads = [(Tensor(a), Tensor(bb), 0.5)]
            return linear4bit(xt, w4, Tensor(b), ads, masks=[mask], fan_in_fan_out=fifo)

        err = max(err, gradcheck(f, [x]).max_rel_error)
        if not fifo:
            xt = Tensor(x, requires_grad=True)
            f(xt).backward(np.ones((2, 3, 6)))
            arrays = {"x": x, "w_hat": w4.dequantize(np.float64), "grad_x_ones": xt.grad}
    return Outcome(err, arrays, "with dropout on the LoRA branch; both layouts")


@equation(
    "qlora.lora_grads",
    what="∂L/∂A = s·(G·B)ᵀ·X̃, ∂L/∂B = s·Gᵀ·(X̃·Aᵀ) over a 4-bit base, vs central differences",
    derivation="qlora_layer.md",
    implements=linear4bit,
    tol=1e-6,
)
def _check_lora_grads() -> Outcome:
    err = 0.0
    for fifo in (False, True):
        w4, _, x, b, a, bb = _example(4, fifo)

        def f(xt, at, bt, w4=w4, b=b, fifo=fifo):
            return linear4bit(xt, w4, Tensor(b), [(at, bt, 0.5)], fan_in_fan_out=fifo)

        err = max(err, gradcheck(f, [x, a, bb], wrt=[1, 2]).max_rel_error)
    return Outcome(err, {"x": x, "A": a, "B": bb})


@equation(
    "loftq.svd_step_optimal",
    what="‖R − s·B·A‖²_F = Σ_{i>r} σᵢ²(R) (Eckart–Young) and s·B·A has rank r",
    derivation="qlora_layer.md",
    implements=lowrank_svd,
    tol=1e-12,
)
def _check_svd_step() -> Outcome:
    rng = np.random.default_rng(5)
    res = rng.standard_normal((12, 9))
    r, s = 3, 2.0
    a, b = lowrank_svd(res, r, s)
    approx = s * (b @ a)
    lam = np.sort(np.linalg.eigvalsh(res.T @ res))[::-1]  # σᵢ² via RᵀR
    tail = float(np.sum(lam[r:]))  # Σ_{i>r} σᵢ²
    err = abs(float(np.sum((res - approx) ** 2)) - tail) / float(np.sum(res**2))
    # the split: B and A carry √(σᵢ/s) each, so BᵀB = AAᵀ = diag(σ_r/s)
    err = max(err, float(np.max(np.abs(b.T @ b - a @ a.T))) / float(np.max(lam)))
    return Outcome(err, {"R": res, "A": a, "B": b, "tail": np.array(tail)})


@equation(
    "loftq.monotone",
    what="LoftQ: E_t = ‖W − Q_t − s·B_t·A_t‖_F never rises at the SVD half-step, E₁ ≤ E₀ "
    "(beats plain QLoRA); final E recomputed from the returned codes, A and B",
    derivation="qlora_layer.md",
    implements=loftq_init,
    tol=1e-12,
)
def _check_monotone() -> Outcome:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((24, 40)) * 0.02  # float64: A, B come back in float64
    s = 2.0
    res = loftq_init(w, 4, s, num_iter=5, quant_type="nf4", blocksize=64)
    e = np.array(res.errors)
    eq = np.array(res.errors_after_quant)
    half = float(np.max(np.maximum(e[1:] - eq, 0.0)))  # SVD step: E after ≤ E before
    first = max(e[1] - e[0], 0.0)  # one round beats B = 0 (E₁ ≤ E₀, Eckart–Young)
    st = res.state
    q = _hand_dequant(res.packed, st.absmax, st.shape, st.blocksize).astype(np.float64)
    final = float(np.linalg.norm(w - q - s * (res.B @ res.A)))
    err = max(half, first, abs(final - e[-1])) / e[0]
    return Outcome(err, {"w": w, "errors": e, "errors_after_quant": eq})
