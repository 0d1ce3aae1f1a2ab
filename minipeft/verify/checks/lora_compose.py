"""Checks for derivations/lora_compose.md: composing adapters and comparing their subspaces.

References: dense sums written out by loops, a construction with known singular values
(Eckart–Young), a construction with known shared directions (subspace similarity), and
float64 central differences (learnable weights).
"""

from __future__ import annotations

import numpy as np

from ...autograd.gradcheck import gradcheck
from ...peft.compose import (
    WeightedLoraSum,
    combine_cat,
    combine_linear,
    combine_svd,
    task_arithmetic,
    weighted_lora_sum,
)
from ...peft.similarity import subspace_similarity
from ..registry import Outcome, equation


def _adapters(seed: int, ranks: tuple[int, ...], d_in: int = 6, d_out: int = 5) -> list:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), 0.5 + k)
        for k, r in enumerate(ranks)
    ]


def _dense_sum(adapters: list, weights: list) -> np.ndarray:
    out = np.zeros((adapters[0][1].shape[0], adapters[0][0].shape[1]))
    for w, (A, B, s) in zip(weights, adapters):
        out += w * s * (B @ A)  # Σ wᵢ sᵢ Bᵢ Aᵢ
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@equation(
    "compose.cat_exact",
    what="[B₁,…,Bₙ]·[w₁s₁A₁;…;wₙsₙAₙ] = Σ wᵢsᵢBᵢAᵢ, rank Σ rᵢ",
    derivation="lora_compose.md",
    implements=combine_cat,
    tol=1e-12,
)
def _check_cat() -> Outcome:
    adapters, w = _adapters(1, (2, 3, 1)), [0.7, -1.2, 2.0]
    A, B, s = combine_cat(adapters, w)
    want = _dense_sum(adapters, w)
    err = _rel(s * B @ A, want) + abs(A.shape[0] - 6)
    return Outcome(error=err, arrays={"weights": np.array(w), "A_cat": A, "B_cat": B, "dW": want})


@equation(
    "compose.linear_cross_terms",
    what="(Σβⱼ Bⱼ)(Σαᵢ Aᵢ) = Σ cᵢBᵢAᵢ + Σ_{i≠j} βⱼαᵢ BⱼAᵢ, αᵢ = sign(cᵢ)√|cᵢ|, βᵢ = √|cᵢ|",
    derivation="lora_compose.md",
    implements=combine_linear,
    tol=1e-12,
)
def _check_linear() -> Outcome:
    adapters, w = _adapters(2, (3, 3)), [0.5, 0.5]
    A, B, _ = combine_linear(adapters, w)
    c = [wi * s for wi, (_, _, s) in zip(w, adapters)]
    a = [np.sign(ci) * np.sqrt(abs(ci)) for ci in c]
    b = [np.sqrt(abs(ci)) for ci in c]
    cross = b[1] * a[0] * adapters[1][1] @ adapters[0][0] + b[0] * a[1] * (
        adapters[0][1] @ adapters[1][0]
    )
    exact = _dense_sum(adapters, w)
    # how large the cross terms are (0.686 here): kept with the golden arrays
    size = np.linalg.norm(cross) / np.linalg.norm(exact)
    return Outcome(
        error=_rel(B @ A, exact + cross),
        arrays={
            "A_lin": A,
            "B_lin": B,
            "dW_exact": exact,
            "cross_terms": cross,
            "cross_rel_size": np.array(size),
        },
    )


@equation(
    "compose.svd_eckart_young",
    what="‖ΔW − B_kA_k‖_F = √(Σ_{j>k} σⱼ²), ‖·‖₂ = σ_{k+1} for the truncated SVD",
    derivation="lora_compose.md",
    implements=combine_svd,
    tol=1e-10,
)
def _check_svd() -> Outcome:
    rng = np.random.default_rng(3)
    sigma = np.array([4.0, 2.0, 1.0, 0.5])
    U, _ = np.linalg.qr(rng.standard_normal((7, 4)))
    V, _ = np.linalg.qr(rng.standard_normal((8, 4)))
    w = [1.5, -0.5]
    # adapter i carries singular triplets 2i, 2i+1, with wᵢ·sᵢ·Bᵢ·Aᵢ = U_i Σ_i V_iᵀ
    adapters = []
    for i in range(2):
        sl = slice(2 * i, 2 * i + 2)
        adapters.append((V[:, sl].T, U[:, sl] * sigma[sl] / (w[i] * 2.0), 2.0))
    dW = U @ np.diag(sigma) @ V.T
    k = 2
    (A, B, _), _S = combine_svd(adapters, w, k)
    E = B @ A - dW
    errs = [
        abs(np.linalg.norm(E) - np.sqrt((sigma[k:] ** 2).sum())),
        abs(np.linalg.norm(E, 2) - sigma[k]),
    ]
    return Outcome(error=max(errs), arrays={"dW": dW, "sigma": sigma, "A_k": A, "B_k": B})


@equation(
    "compose.task_arithmetic",
    what="x·(W₀ + Σλᵢsᵢ BᵢAᵢ)ᵀ = x·W₀ᵀ + Σ λᵢsᵢ(x·Aᵢᵀ)·Bᵢᵀ; λ = −1 removes an adapter",
    derivation="lora_compose.md",
    implements=task_arithmetic,
    tol=1e-12,
)
def _check_task_arithmetic() -> Outcome:
    rng = np.random.default_rng(4)
    W0 = rng.standard_normal((5, 6))
    adapters, lam = _adapters(5, (2, 3)), [1.0, -0.4]
    x = rng.standard_normal((3, 6))
    merged = task_arithmetic(W0, adapters, lam)
    per_adapter = x @ W0.T
    for li, (A, B, s) in zip(lam, adapters):
        per_adapter = per_adapter + li * s * (x @ A.T) @ B.T
    removed = task_arithmetic(task_arithmetic(W0, adapters[:1], [1.0]), adapters[:1], [-1.0])
    err = max(_rel(x @ merged.T, per_adapter), _rel(removed, W0))
    return Outcome(error=err, arrays={"W0": W0, "x": x, "lam": np.array(lam), "W": merged})


@equation(
    "compose.grad_lambda",
    what="∂L/∂λᵢ = sᵢ·⟨G·Bᵢ, X·Aᵢᵀ⟩_F, ∂L/∂X = Σ λᵢsᵢ(G·Bᵢ)·Aᵢ",
    derivation="lora_compose.md",
    implements=WeightedLoraSum,
    tol=1e-6,
)
def _check_grad_lambda() -> Outcome:
    adapters = _adapters(6, (1, 3, 2), d_in=5, d_out=4)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5))
    lam = np.array([0.4, -1.1, 0.7])
    res = gradcheck(lambda x, lam: weighted_lora_sum(x, lam, adapters), [x, lam])
    return Outcome(error=res.max_rel_error, arrays={"x": x, "lam": lam})


@equation(
    "lora.subspace_similarity",
    what="φ(A₁, A₂, i, j) = ‖V₁[:, :i]ᵀV₂[:, :j]‖²_F / min(i, j), V = right-singular vectors",
    derivation="lora_compose.md",
    implements=subspace_similarity,
    tol=1e-10,
)
def _check_similarity() -> Outcome:
    rng = np.random.default_rng(8)
    V, _ = np.linalg.qr(rng.standard_normal((12, 8)))
    m = 2  # the two leading directions are shared
    A1 = np.diag([5.0, 4.0, 3.0, 2.0]) @ V[:, :4].T  # directions 0, 1, 2, 3
    A2 = np.diag([6.0, 5.0, 4.0, 3.0, 2.0]) @ np.concatenate([V[:, :m], V[:, 5:8]], axis=1).T
    phi = np.array([[subspace_similarity(A1, A2, i, j) for j in range(1, 6)] for i in range(1, 5)])
    want = np.array([[min(i, j, m) / min(i, j) for j in range(1, 6)] for i in range(1, 5)])
    return Outcome(error=float(np.max(np.abs(phi - want))), arrays={"A1": A1, "A2": A2, "phi": phi})
