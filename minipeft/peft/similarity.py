"""Normalized subspace similarity between adapters (Hu et al., 2021, LoRA paper §7.2).

For two LoRA "A" matrices A₁ (r₁, in) and A₂ (r₂, in), take their SVDs Aₖ = Uₖ·Σₖ·Vₖᵀ.
The columns of Vₖ (in, rₖ) — the RIGHT-singular vectors, which live in the input space
ℝ^in — are ordered by decreasing singular value; the paper calls this matrix U_{A_r}
("right-singular unitary matrix"). With V₁ⁱ = V₁[:, :i] and V₂ʲ = V₂[:, :j]:

    φ(A₁, A₂, i, j) = ‖V₁ⁱᵀ·V₂ʲ‖²_F / min(i, j) = (Σₖ cos²θₖ) / min(i, j)   ∈ [0, 1]

where θₖ are the principal angles between span(V₁ⁱ) and span(V₂ʲ) — a Grassmann-style
measure (derivations/lora_compose.md, ``lora.subspace_similarity``). φ = 1 when one
subspace contains the other, 0 when they are orthogonal.

Invariances (tested): φ(A, A, i, i) = 1; φ is unchanged when A is replaced by Q·A with Q
orthogonal (r × r) — the right-singular vectors are the same up to sign — for every i, j;
for a general invertible M (r × r), M·A has the same row space, so only φ(·, ·, r₁, r₂),
which compares the whole row spaces, is invariant: the top-i directions change.
The singular vectors beyond rank(A) are arbitrary; use i ≤ rank(A₁), j ≤ rank(A₂).
"""

from __future__ import annotations

import numpy as np

from ..backend import Array, to_numpy, xp_of

__all__ = ["right_singular_basis", "subspace_similarity", "subspace_similarity_grid"]


def right_singular_basis(A: Array) -> Array:
    """V (in, r): right-singular vectors of A (r, in) as columns, by decreasing σ."""
    if getattr(A, "ndim", 0) != 2:
        raise ValueError(f"A: expected a matrix (r, in), got shape {getattr(A, 'shape', None)}")
    if A.shape[0] > A.shape[1]:
        raise ValueError(f"A: expected r ≤ in for a LoRA A (r, in), got shape {tuple(A.shape)}")
    xp = xp_of(A)
    _, _, Vh = xp.linalg.svd(A, full_matrices=False)  # A = U Σ Vh,  Vh (r, in)
    return Vh.T  # (in, r)


def _check_ij(i: int, j: int, r1: int, r2: int) -> None:
    if not isinstance(i, int | np.integer) or not 1 <= i <= r1:
        raise ValueError(f"i: expected an integer in [1, {r1}] (rank of A1), got {i!r}")
    if not isinstance(j, int | np.integer) or not 1 <= j <= r2:
        raise ValueError(f"j: expected an integer in [1, {r2}] (rank of A2), got {j!r}")


def subspace_similarity(A1: Array, A2: Array, i: int, j: int) -> float:
    """φ(A₁, A₂, i, j) = ‖V₁[:, :i]ᵀ·V₂[:, :j]‖²_F / min(i, j) — [lora.subspace_similarity]."""
    V1, V2 = right_singular_basis(A1), right_singular_basis(A2)
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"A2: expected in = {V1.shape[0]} as A1, got {V2.shape[0]}")
    _check_ij(i, j, V1.shape[1], V2.shape[1])
    P = V1[:, :i].T @ V2[:, :j]  # (i, j): cosines between the two bases
    return float((P * P).sum() / min(i, j))  # ‖P‖²_F / min(i, j)


def subspace_similarity_grid(A1: Array, A2: Array) -> np.ndarray:
    """The matrix Φ (r₁, r₂) with Φ[i−1, j−1] = φ(A₁, A₂, i, j), for a heatmap (paper Fig. 3).

    Uses prefix sums: ‖V₁ⁱᵀV₂ʲ‖²_F = Σ_{a≤i, b≤j} P²[a, b] with P = V₁ᵀV₂.
    """
    V1, V2 = right_singular_basis(A1), right_singular_basis(A2)
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"A2: expected in = {V1.shape[0]} as A1, got {V2.shape[0]}")
    P2 = to_numpy((V1.T @ V2) ** 2).astype(np.float64)  # (r₁, r₂), for plotting
    cum = P2.cumsum(axis=0).cumsum(axis=1)  # ‖V₁ⁱᵀV₂ʲ‖²_F for every (i, j)
    i = np.arange(1, V1.shape[1] + 1)[:, None]
    j = np.arange(1, V2.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)
