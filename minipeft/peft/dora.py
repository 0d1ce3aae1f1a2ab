"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024; derivations/lora_family.md).

The adapted weight is split into a magnitude m (one number per output row) and a direction:

    W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_row                                   [dora.forward]

with m initialized to ‖W₀‖_row so that W' = W₀ at start (B = 0). As in the paper's §4.3 and
in HF PEFT, the norm n = ‖W₀ + s·B·A‖_row is treated as a constant in backward (detached):
it saves memory and the paper reports no loss in accuracy. With c = m/n (per row), the
layer's output, written as HF PEFT computes it on top of the base layer's output, is

    H = X·W₀ᵀ + b + (c − 1) ⊙ (X̃·W₀ᵀ) + s·c ⊙ (X̃·Aᵀ·Bᵀ)

(X̃ = X without dropout, so H = b + c ⊙ (X·(W₀ + s·B·A)ᵀ)). ``DoraFunction`` computes the
second line's last two terms (the "delta") and its closed-form backward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Function, Tensor
from ..backend import Array

__all__ = ["DoraFunction", "dora_delta", "dora_merged_weight", "dora_weight_norm"]


def dora_weight_norm(w0: Array, b: Array, a: Array, scale: float) -> Array:
    """n = ‖W₀ + s·B·A‖ per output row (W₀ in the (out, in) layout).   [dora.weight_norm]"""
    xp = backend.xp_of(w0)
    w = w0 + scale * (b @ a)  # W₀ + s·B·A   (out, in)
    return xp.sqrt((w * w).sum(axis=1))  # ‖·‖ over the input axis   (out,)


def dora_merged_weight(w0: Array, b: Array, a: Array, m: Array, scale: float) -> Array:
    """W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_row, the weight DoRA merges into W₀.  [dora.merge]"""
    w = w0 + scale * (b @ a)  # (out, in)
    n = dora_weight_norm(w0, b, a, scale)
    return (m / n)[:, None] * w  # W' = (m/n) ⊙ (W₀ + s·B·A)


class DoraFunction(Function):
    """Δ = (c − 1) ⊙ (X̃·W₀ᵀ) + s·c ⊙ (X̃·Aᵀ·Bᵀ), c = m/n with n detached; fused backward.

    Inputs x (..., in), w0 (out, in) or (in, out) with ``fan_in_fan_out``, m (out,),
    A (r, in), B (out, r). With G = ∂L/∂Δ, V = X̃·W₀ᵀ, U = X̃·Aᵀ, P = U·Bᵀ:

        ∂L/∂m = Σₙ G ⊙ (V + s·P) / n                                        [dora.grad_m]
        ∂L/∂B = s·(G ⊙ c)ᵀ·U                                                 [dora.grad_B]
        ∂L/∂A = s·((G ⊙ c)·B)ᵀ·X̃                                            [dora.grad_A]
        ∂L/∂X = [(G ⊙ (c − 1))·W₀ + s·((G ⊙ c)·B)·A] ⊙ M/(1−p)             [dora.grad_X]
    """

    def forward(
        self,
        x: Array,
        w0: Array,
        m: Array,
        a: Array,
        b: Array,
        *,
        scale: float,
        mask: Array | None,
        fan_in_fan_out: bool,
    ) -> Array:
        self.lead, k = x.shape[:-1], x.shape[-1]
        xs = x.reshape(-1, k)  # (N, in)
        if mask is not None:
            mask = mask.reshape(-1, k)
            xs = xs * mask  # X̃ = X ⊙ M/(1−p)
        w_oi = w0.T if fan_in_fan_out else w0  # (out, in)
        n = dora_weight_norm(w_oi, b, a, scale)  # detached: a constant for backward
        c = m / n  # (out,)
        v = xs @ w_oi.T  # V = X̃·W₀ᵀ   (N, out)
        u = xs @ a.T  # U = X̃·Aᵀ     (N, r)
        p = u @ b.T  # P = U·Bᵀ      (N, out)
        self.saved = (xs, w_oi, a, b, n, c, v, u, p, mask, scale)
        delta = (c - 1) * v + scale * c * p  # Δ = (c−1)⊙V + s·c⊙P
        return delta.reshape(*self.lead, delta.shape[-1])  # (..., out)

    def backward(self, grad: Array) -> tuple[Array | None, ...]:
        xs, w_oi, a, b, n, c, v, u, p, mask, s = self.saved
        g = grad.reshape(-1, grad.shape[-1])  # G (N, out)
        gc = g * c  # G ⊙ c
        gx = gm = ga = gb = None
        if self.needs_input_grad[2]:
            gm = (g * (v + s * p)).sum(axis=0) / n  # ∂L/∂m = Σₙ G⊙(V + s·P)/n
        if self.needs_input_grad[4]:
            gb = s * (gc.T @ u)  # ∂L/∂B = s·(G⊙c)ᵀ·U
        gcb = gc @ b if (self.needs_input_grad[3] or self.needs_input_grad[0]) else None  # (N, r)
        if self.needs_input_grad[3]:
            ga = s * (gcb.T @ xs)  # ∂L/∂A = s·((G⊙c)·B)ᵀ·X̃
        if self.needs_input_grad[0]:
            gx = (g * (c - 1)) @ w_oi + s * (gcb @ a)  # ∂L/∂X̃
            if mask is not None:
                gx = gx * mask  # ∂L/∂X = ∂L/∂X̃ ⊙ M/(1−p)
            gx = gx.reshape(*self.lead, gx.shape[-1])
        return gx, None, gm, ga, gb


def dora_delta(
    x: Tensor,
    w0: Tensor,
    m: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    *,
    mask: Array | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """DoRA's addition to the base output (see ``DoraFunction``).

    [dora.forward]  H = X·W₀ᵀ + b + Δ = b + (m/n) ⊙ X·(W₀ + s·B·A)ᵀ   (no dropout)
    [dora.grad_m] [dora.grad_A] [dora.grad_B] [dora.grad_X] are computed by its backward.
    """
    out_f = w0.shape[1] if fan_in_fan_out else w0.shape[0]
    if w0.requires_grad:
        raise ValueError("w0: DoRA's base weight must be frozen (requires_grad=False)")
    if m.shape != (out_f,):
        raise ValueError(f"m: expected the magnitude vector of shape {(out_f,)}, got {m.shape}")
    return DoraFunction.apply(
        x, w0, m, a, b, scale=float(scale), mask=mask, fan_in_fan_out=bool(fan_in_fan_out)
    )


def dora_reference_output(
    x: np.ndarray, w0: np.ndarray, bias: Any, m: np.ndarray, a: np.ndarray, b: np.ndarray, s: float
) -> np.ndarray:
    """The paper's formula H = b + X·W'ᵀ with W' = m ⊙ (W₀+s·B·A)/‖W₀+s·B·A‖_row (reference)."""
    w = w0 + s * (b @ a)
    wn = m[:, None] * w / np.linalg.norm(w, axis=1, keepdims=True)
    y = x @ wn.T
    return y + bias if bias is not None else y
