"""Checks for derivations/lora.md: the fused LoRA Function, merge, PiSSA and OLoRA inits.

Gradients are compared with float64 central differences of the layer's output; the forward,
merge and inits with exact references computed here in NumPy from the formulas (the merged
weight W₀ + s·B·A, an SVD, a QR) — never with a second run of the code under test.
"""

from __future__ import annotations

import numpy as np

from ... import backend
from ...autograd.gradcheck import gradcheck, rel_error
from ...autograd.tensor import Tensor
from ...nn.conv1d import Conv1D
from ...nn.layers import Linear
from ...peft.lora import LoraLayer, lora_linear, olora_init, pissa_init
from ..registry import Outcome, equation

S = 0.75  # the scale s = α/r used by the checks


def _scaled(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a − ref| / max |ref| (for matrices with exact zeros, e.g. triangular R)."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _case(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((2, 3, 5)),  # (batch, tokens, in)
        "w0": rng.standard_normal((4, 5)),  # (out, in)
        "bias": rng.standard_normal(4),
        "A": rng.standard_normal((2, 5)),  # (r, in)
        "B": rng.standard_normal((4, 2)),  # (out, r)
        "G": rng.standard_normal((2, 3, 4)),  # upstream gradient ∂L/∂H
    }


def _grad_check(index: int, name: str) -> Outcome:
    c = _case()
    worst = 0.0
    for fifo in (False, True):  # Linear (out, in) and Conv1D (in, out) layouts
        w0 = np.ascontiguousarray(c["w0"].T) if fifo else c["w0"]

        def f(x, w, b, a, bb, fifo=fifo):
            return lora_linear(x, w, b, [(a, bb, S)], fan_in_fan_out=fifo)

        inputs = [c["x"], w0, c["bias"], c["A"], c["B"]]
        worst = max(worst, gradcheck(f, inputs, wrt=[index]).max_rel_error)
    ts = [Tensor(c[k], requires_grad=True) for k in ("x", "w0", "bias", "A", "B")]
    ts[1].requires_grad = False  # W₀ frozen, as in LoRA
    lora_linear(ts[0], ts[1], ts[2], [(ts[3], ts[4], S)]).backward(c["G"])
    arrays = {k: c[k] for k in ("x", "w0", "bias", "A", "B", "G")}
    arrays["s"] = np.array(S)
    arrays[name] = {0: ts[0], 3: ts[3], 4: ts[4]}[index].grad
    return Outcome(error=worst, arrays=arrays)


@equation(
    "lora.forward",
    what="H = X·W₀ᵀ + b + s·(X·Aᵀ)·Bᵀ equals X·(W₀ + s·B·A)ᵀ + b",
    derivation="lora.md",
    implements=lora_linear,
    tol=1e-12,
)
def _check_forward() -> Outcome:
    c = _case()
    ref = c["x"] @ (c["w0"] + S * c["B"] @ c["A"]).T + c["bias"]  # merged-weight form
    err = 0.0
    for fifo in (False, True):
        w0 = np.ascontiguousarray(c["w0"].T) if fifo else c["w0"]
        h = lora_linear(
            Tensor(c["x"]), Tensor(w0), Tensor(c["bias"]), [(Tensor(c["A"]), Tensor(c["B"]), S)],
            fan_in_fan_out=fifo,
        ).data  # fmt: skip
        err = max(err, rel_error(h, ref, atol=1e-12))
    arrays = {k: c[k] for k in ("x", "w0", "bias", "A", "B")}
    arrays.update(s=np.array(S), H=ref)
    return Outcome(error=err, arrays=arrays)


@equation(
    "lora.grad_A",
    what="∂L/∂A = s·(G·B)ᵀ·X",
    derivation="lora.md",
    implements=lora_linear,
    tol=1e-6,
)
def _check_grad_a() -> Outcome:
    return _grad_check(3, "grad_A")


@equation(
    "lora.grad_B",
    what="∂L/∂B = s·Gᵀ·(X·Aᵀ)",
    derivation="lora.md",
    implements=lora_linear,
    tol=1e-6,
)
def _check_grad_b() -> Outcome:
    return _grad_check(4, "grad_B")


@equation(
    "lora.grad_X",
    what="∂L/∂X = G·W₀ + s·(G·B)·A (no ∂L/∂W₀ formed)",
    derivation="lora.md",
    implements=lora_linear,
    tol=1e-6,
)
def _check_grad_x() -> Outcome:
    return _grad_check(0, "grad_X")


@equation(
    "lora.merge",
    what="merge: W₀ ← W₀ + s·B·A gives the same output; unmerge restores W₀",
    derivation="lora.md",
    implements=LoraLayer.merge,
    tol=1e-12,
)
def _check_merge() -> Outcome:
    err = 0.0
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6))
    arrays: dict[str, np.ndarray] = {}
    for kind in ("linear", "conv1d"):
        with backend.dtype_policy("float64"):
            backend.seed(5)
            base = Linear(6, 4) if kind == "linear" else Conv1D(6, 4)
            layer = LoraLayer(base)
            layer.add_adapter("a", r=2, lora_alpha=1.5, init_lora_weights=False)
        w0 = layer._w0_out_in().copy()
        a, b = layer.lora_A["a"].weight.data, layer.lora_B["a"].weight.data
        ref = x @ w0.T + base.bias.data + S * (x @ a.T) @ b.T  # s = α/r = 0.75
        layer.merge()
        merged_w = layer._w0_out_in().copy()
        y = layer(Tensor(x)).data
        layer.unmerge()
        err = max(err, rel_error(y, ref, atol=1e-12), float(np.abs(layer._w0_out_in() - w0).max()))
        err = max(err, rel_error(merged_w, w0 + S * b @ a, atol=1e-12))
        if kind == "linear":
            arrays = {"x": x, "w0": w0, "A": a, "B": b, "s": np.array(S), "W_merged": merged_w}
    return Outcome(error=err, arrays=arrays)


@equation(
    "lora.pissa_init",
    what="PiSSA: s·B·A = U_r·S_r·V_rᵀ and W₀' + s·B·A = W₀",
    derivation="lora.md",
    implements=pissa_init,
    tol=1e-12,
)
def _check_pissa() -> Outcome:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 5))
    r = 2
    w_res, a, b = pissa_init(w, r, S)
    u, sv, vt = np.linalg.svd(w)
    top = (u[:, :r] * sv[:r]) @ vt[:r]  # U_r·S_r·V_rᵀ (reference SVD)
    err = max(
        rel_error(w_res + S * b @ a, w, atol=1e-12),
        rel_error(S * b @ a, top, atol=1e-12),
        rel_error(np.linalg.svd(w_res, compute_uv=False)[: 5 - r], sv[r:], atol=1e-12),
    )
    return Outcome(error=err, arrays={"W": w, "r": np.array(r), "s": np.array(S), "A": a, "B": b,
                                      "W_res": w_res})  # fmt: skip


@equation(
    "lora.olora_init",
    what="OLoRA: B = Q_r orthonormal, A = R_r, W₀' + s·B·A = W₀",
    derivation="lora.md",
    implements=olora_init,
    tol=1e-12,
)
def _check_olora() -> Outcome:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5))
    r = 3
    w_res, a, b = olora_init(w, r, S)
    err = max(
        rel_error(w_res + S * b @ a, w, atol=1e-12),
        _scaled(b.T @ b, np.eye(r)),
        _scaled(a, b.T @ w),  # A = Q_rᵀ·W (R's first r rows; zeros below the diagonal)
    )
    return Outcome(error=err, arrays={"W": w, "r": np.array(r), "s": np.array(S), "A": a, "B": b,
                                      "W_res": w_res})  # fmt: skip
