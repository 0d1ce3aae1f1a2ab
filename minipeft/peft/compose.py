"""Composing LoRA adapters: pure functions over (A, B, scaling) triples.

Derivations: derivations/lora_compose.md.

An adapter is a triple (A, B, s) with A (r, in), B (out, r); its update is ΔW = s·B·A
(out, in). Given adapters 1…n and weights wᵢ, the composition we usually *want* is

    ΔW* = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ                                    (the weighted sum of updates)

and the question for each recipe is whether it yields ΔW* exactly:

- ``combine_cat``     exact: stack the factors, rank Σ rᵢ           [compose.cat_exact]
- ``combine_linear``  HF PEFT's ``linear``: combines the A's and the B's separately with
                      √|cᵢ| (cᵢ = wᵢsᵢ); the product has cross terms Bⱼ·Aᵢ (i ≠ j)
                                                                    [compose.linear_cross_terms]
- ``combine_svd``     form ΔW* and keep its best rank-k part (Eckart–Young); the error
                      is exactly the tail of its singular values  [compose.svd_eckart_young]
- ``task_arithmetic`` merge into the base weight, W₀ + Σ λᵢ·ΔWᵢ (λ < 0 removes a skill)
                                                                    [compose.task_arithmetic]
- ``weighted_lora_sum`` / ``WeightedLoraSum``  y = Σ λᵢ·sᵢ·(X·Aᵢᵀ)·Bᵢᵀ with LEARNABLE λ and
                      frozen adapters (LoraHub-style); ∂L/∂λᵢ = sᵢ·⟨G·Bᵢ, X·Aᵢᵀ⟩
                                                                    [compose.grad_lambda]

Every combined adapter is returned with scaling 1.0 (the weights and scalings are folded
into its factors), as HF PEFT's ``add_weighted_adapter`` does (it sets lora_alpha = r).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..autograd.tensor import Function, Tensor
from ..backend import Array, xp_of

__all__ = [
    "WeightedLoraSum",
    "combine_cat",
    "combine_linear",
    "combine_svd",
    "combined_delta",
    "delta_weight",
    "linear_cross_terms",
    "task_arithmetic",
    "weighted_lora_sum",
]

Adapter = tuple[Array, Array, float]  # (A (r, in), B (out, r), scaling s)


# ---------------------------------------------------------------------------- validation
def _check_adapters(adapters: Sequence[Adapter], weights: Sequence[float] | None) -> list[float]:
    """Validate shapes (common in/out, A/B ranks agree); return weights as floats."""
    if len(adapters) == 0:
        raise ValueError("adapters: expected at least one (A, B, scaling), got none")
    d_in = d_out = None
    for i, item in enumerate(adapters):
        if len(item) != 3:
            raise ValueError(f"adapters[{i}]: expected (A, B, scaling), got {len(item)} items")
        A, B, _ = item
        if getattr(A, "ndim", 0) != 2 or getattr(B, "ndim", 0) != 2:
            raise ValueError(
                f"adapters[{i}]: expected A (r, in) and B (out, r), got shapes "
                f"{getattr(A, 'shape', None)} and {getattr(B, 'shape', None)}"
            )
        if A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapters[{i}]: rank of A ({A.shape[0]}) differs from rank of B ({B.shape[1]})"
            )
        if d_in is None:
            d_in, d_out = A.shape[1], B.shape[0]
        elif (A.shape[1], B.shape[0]) != (d_in, d_out):
            raise ValueError(
                f"adapters[{i}]: expected (in, out) = {(d_in, d_out)} as adapters[0], "
                f"got {(A.shape[1], B.shape[0])}"
            )
    if weights is None:
        return [1.0] * len(adapters)
    w = [float(x) for x in weights]
    if len(w) != len(adapters):
        raise ValueError(f"weights: expected {len(adapters)} weights, got {len(w)}")
    return w


def delta_weight(A: Array, B: Array, scaling: float) -> Array:
    """ΔW = s·B·A (out, in): the update one adapter adds to W₀."""
    return scaling * (B @ A)


def combined_delta(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Array:
    """ΔW* = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ (out, in): the weighted sum of the updates (dense)."""
    w = _check_adapters(adapters, weights)
    return sum(wi * delta_weight(A, B, s) for wi, (A, B, s) in zip(w, adapters))


# ---------------------------------------------------------------------------- cat
def combine_cat(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Exact combination by concatenation — [compose.cat_exact].

        A_cat = [w₁s₁A₁; w₂s₂A₂; …]  (Σrᵢ, in)      B_cat = [B₁, B₂, …]  (out, Σrᵢ)
        B_cat·A_cat = Σᵢ Bᵢ·(wᵢsᵢAᵢ) = Σᵢ wᵢsᵢBᵢAᵢ = ΔW*        (block product, exact)

    Returns (A_cat, B_cat, 1.0); the rank is the sum of the ranks. Same layout as HF PEFT's
    ``combination_type="cat"`` (weight and scaling folded into A).
    """
    w = _check_adapters(adapters, weights)
    xp = xp_of(adapters[0][0])
    A_cat = xp.concatenate([wi * s * A for wi, (A, _, s) in zip(w, adapters)], axis=0)
    B_cat = xp.concatenate([B for _, B, _ in adapters], axis=1)
    return A_cat, B_cat, 1.0


# ---------------------------------------------------------------------------- linear
def _linear_coefficients(adapters: Sequence[Adapter], w: list[float]) -> tuple[list, list]:
    """PEFT's split of cᵢ = wᵢsᵢ: αᵢ = sign(cᵢ)·√|cᵢ| on A, βᵢ = √|cᵢ| on B (αᵢβᵢ = cᵢ)."""
    c = [wi * s for wi, (_, _, s) in zip(w, adapters)]
    alpha = [float(np.sign(ci) if ci != 0 else 1.0) * float(np.sqrt(abs(ci))) for ci in c]
    beta = [float(np.sqrt(abs(ci))) for ci in c]
    return alpha, beta


def combine_linear(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """HF PEFT's ``linear`` combination, which is NOT ΔW* — [compose.linear_cross_terms].

    With cᵢ = wᵢsᵢ, αᵢ = sign(cᵢ)√|cᵢ|, βᵢ = √|cᵢ| (so αᵢβᵢ = cᵢ):

        A_lin = Σᵢ αᵢ·Aᵢ      B_lin = Σⱼ βⱼ·Bⱼ        (all ranks equal)
        B_lin·A_lin = Σᵢ cᵢ·BᵢAᵢ + Σ_{i≠j} βⱼαᵢ·BⱼAᵢ = ΔW* + cross terms

    Returns (A_lin, B_lin, 1.0); ``linear_cross_terms`` gives the cross terms in closed form.
    """
    w = _check_adapters(adapters, weights)
    ranks = {A.shape[0] for A, _, _ in adapters}
    if len(ranks) != 1:
        raise ValueError(f"adapters: 'linear' needs equal ranks, got ranks {sorted(ranks)}")
    alpha, beta = _linear_coefficients(adapters, w)
    A_lin = sum(a * A for a, (A, _, _) in zip(alpha, adapters))  # Σ αᵢ Aᵢ
    B_lin = sum(b * B for b, (_, B, _) in zip(beta, adapters))  # Σ βⱼ Bⱼ
    return A_lin, B_lin, 1.0


def linear_cross_terms(
    adapters: Sequence[Adapter], weights: Sequence[float] | None = None
) -> Array:
    """Σ_{i≠j} βⱼ·αᵢ·Bⱼ·Aᵢ (out, in): what ``combine_linear`` adds on top of ΔW*."""
    w = _check_adapters(adapters, weights)
    alpha, beta = _linear_coefficients(adapters, w)
    xp = xp_of(adapters[0][0])
    A0, B0, _ = adapters[0]
    out = xp.zeros((B0.shape[0], A0.shape[1]), dtype=A0.dtype)
    for i, (Ai, _, _) in enumerate(adapters):
        for j, (_, Bj, _) in enumerate(adapters):
            if i != j:
                out += (beta[j] * alpha[i]) * (Bj @ Ai)  # cross term βⱼαᵢ·Bⱼ·Aᵢ
    return out


# ---------------------------------------------------------------------------- svd
def combine_svd(
    adapters: Sequence[Adapter], weights: Sequence[float] | None, rank: int
) -> tuple[Adapter, Array]:
    """Best rank-k adapter for ΔW* (Eckart–Young) — [compose.svd_eckart_young].

        ΔW* = U·Σ·Vᵀ,   B = U[:, :k]·Σ[:k],   A = Vᵀ[:k]       (scaling 1)
        ‖ΔW* − B·A‖_F = √(Σ_{j>k} σⱼ²),   ‖ΔW* − B·A‖₂ = σ_{k+1}

    and no matrix of rank ≤ k is closer in either norm. Exact when k ≥ rank(ΔW*) (at most
    Σ rᵢ). The split (ΣU, Vᵀ) is HF PEFT's ``svd``. Returns ((A, B, 1.0), σ) with all the
    singular values σ of ΔW*, so the caller can read the discarded tail σ[k:].
    """
    w = _check_adapters(adapters, weights)
    if not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    dW = combined_delta(adapters, w)
    if rank > min(dW.shape):
        raise ValueError(f"rank: expected at most min(out, in) = {min(dW.shape)}, got {rank}")
    xp = xp_of(dW)
    U, S, Vh = xp.linalg.svd(dW, full_matrices=False)  # ΔW* = U diag(S) Vh
    B = U[:, :rank] * S[:rank]  # (out, k)   U_k Σ_k
    A = Vh[:rank]  # (k, in)
    return (A, B, 1.0), S


# ---------------------------------------------------------------------------- task arithmetic
def task_arithmetic(
    weight: Array, adapters: Sequence[Adapter], weights: Sequence[float] | None = None
) -> Array:
    """Merged weight W = W₀ + Σᵢ λᵢ·sᵢ·Bᵢ·Aᵢ — [compose.task_arithmetic].

    Task vectors (Ilharco et al., 2023) for LoRA: each adapter's update is a task vector;
    λ > 0 adds a skill, λ < 0 removes one (W₀ + ΔW − ΔW = W₀), sums combine skills. The merged
    layer computes X·Wᵀ = X·W₀ᵀ + Σᵢ λᵢsᵢ(X·Aᵢᵀ)·Bᵢᵀ: the same as running every adapter.
    """
    w = _check_adapters(adapters, weights)
    out_in = (adapters[0][1].shape[0], adapters[0][0].shape[1])
    if getattr(weight, "ndim", 0) != 2 or tuple(weight.shape) != out_in:
        raise ValueError(
            f"weight: expected shape (out, in) = {out_in}, got {getattr(weight, 'shape', None)}"
        )
    return weight + combined_delta(adapters, w)


# ---------------------------------------------------------------------------- learnable λ
class WeightedLoraSum(Function):
    """y = Σᵢ λᵢ·sᵢ·(X·Aᵢᵀ)·Bᵢᵀ with learnable λ (n,) and frozen adapters — [compose.grad_lambda].

    Inputs: x (N, in), lam (n,). Params: A (n, r_max, in), B (n, out, r_max), scaling (n,)
    (adapters stacked, zero-padded). With G = ∂L/∂y (N, out), uᵢ = X·Aᵢᵀ (N, r):

        ∂L/∂λᵢ = sᵢ·⟨G, uᵢ·Bᵢᵀ⟩_F = sᵢ·⟨G·Bᵢ, uᵢ⟩_F          (never forms Bᵢ·Aᵢ)
        ∂L/∂X  = Σᵢ λᵢ·sᵢ·(G·Bᵢ)·Aᵢ
    """

    def forward(self, x: Array, lam: Array, *, A: Array, B: Array, scaling: Array) -> Array:
        xp = xp_of(x, A)
        u = xp.einsum("nj,akj->ank", x, A)  # (n_adapters, N, r_max)   uᵢ = X Aᵢᵀ
        c = lam * scaling  # (n,)   λᵢ sᵢ
        # y = Σᵢ λᵢ sᵢ uᵢ Bᵢᵀ
        y = xp.einsum("ank,aok->no", u * c[:, None, None], B)
        self.u, self.x_shape, self.lam, self.A, self.B, self.scaling = (
            u,
            x.shape,
            lam,
            A,
            B,
            scaling,
        )
        return y

    def backward(self, grad: Array) -> tuple[Array | None, Array | None]:
        xp = xp_of(grad, self.B)
        gB = xp.einsum("no,aok->ank", grad, self.B)  # (n_adapters, N, r_max)   G Bᵢ
        g_x = g_lam = None
        if self.needs_input_grad[1]:
            # ∂L/∂λᵢ = sᵢ ⟨G Bᵢ, uᵢ⟩
            g_lam = self.scaling * xp.einsum("ank,ank->a", gB, self.u)
        if self.needs_input_grad[0]:
            c = self.lam * self.scaling
            # ∂L/∂X = Σᵢ λᵢ sᵢ (G Bᵢ) Aᵢ
            g_x = xp.einsum("ank,akj->nj", gB * c[:, None, None], self.A)
        return g_x, g_lam


def weighted_lora_sum(x: Tensor, lam: Tensor, adapters: Sequence[Adapter]) -> Tensor:
    """Σᵢ λᵢ·sᵢ·(X·Aᵢᵀ)·Bᵢᵀ for x (..., in) and learnable lam (n,); returns (..., out)."""
    from .serving import stack_adapters

    _check_adapters(adapters, None)
    if not isinstance(x, Tensor) or not isinstance(lam, Tensor):
        raise TypeError(
            f"x, lam: expected Tensors, got {type(x).__name__} and {type(lam).__name__}"
        )
    if lam.shape != (len(adapters),):
        raise ValueError(f"lam: expected shape ({len(adapters)},), got {lam.shape}")
    if x.shape[-1] != adapters[0][0].shape[1]:
        raise ValueError(f"x: expected last dimension {adapters[0][0].shape[1]}, got {x.shape}")
    if x.dtype != lam.dtype:
        raise TypeError(f"lam: dtype {lam.dtype} differs from x's {x.dtype}")
    stack = stack_adapters(adapters, dtype=x.dtype)
    lead = x.shape[:-1]
    y = WeightedLoraSum.apply(
        x.reshape(-1, x.shape[-1]), lam, A=stack.A, B=stack.B, scaling=stack.scaling
    )
    return y.reshape((*lead, y.shape[-1]))
