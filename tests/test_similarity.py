"""Normalized subspace similarity φ (LoRA paper §7.2): bounds, identities, invariances.

Expected values come from constructions with known right-singular vectors (φ is then a
count of shared directions) and from SciPy's principal angles (Σ cos²θ = ‖V₁ᵀV₂‖²_F).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import subspace_angles

from minipeft.peft.similarity import (
    right_singular_basis,
    subspace_similarity,
    subspace_similarity_grid,
)


@st.composite
def two_As(draw):
    d_in = draw(st.integers(2, 12))
    r1, r2 = draw(st.integers(1, d_in)), draw(st.integers(1, d_in))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return rng.standard_normal((r1, d_in)), rng.standard_normal((r2, d_in)), rng


@given(two_As())
def test_phi_in_unit_interval_and_equals_principal_angles(data):
    A1, A2, _ = data
    grid = subspace_similarity_grid(A1, A2)
    assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)
    V1, V2 = right_singular_basis(A1), right_singular_basis(A2)
    for i in range(1, A1.shape[0] + 1):
        for j in range(1, A2.shape[0] + 1):
            cos2 = np.cos(subspace_angles(V1[:, :i], V2[:, :j])) ** 2
            want = cos2.sum() / min(i, j)
            assert abs(subspace_similarity(A1, A2, i, j) - want) < 1e-10
            assert abs(grid[i - 1, j - 1] - want) < 1e-10


@given(two_As())
def test_self_similarity_is_one(data):
    A1, _, _ = data
    for i in range(1, A1.shape[0] + 1):
        assert abs(subspace_similarity(A1, A1, i, i) - 1.0) < 1e-12


@given(two_As())
def test_orthogonal_row_mixing_leaves_phi_unchanged(data):
    """Q·A (Q orthogonal) has the same Σ and V: φ unchanged for every (i, j)."""
    A1, A2, rng = data
    Q, _ = np.linalg.qr(rng.standard_normal((A1.shape[0],) * 2))
    g = subspace_similarity_grid(A1, A2)
    np.testing.assert_allclose(subspace_similarity_grid(Q @ A1, A2), g, atol=1e-8)


@given(two_As())
def test_invertible_row_mixing_keeps_the_full_row_space(data):
    """M·A (M invertible) spans the same row space: φ(·, ·, r₁, r₂) is unchanged."""
    A1, A2, rng = data
    r1, r2 = A1.shape[0], A2.shape[0]
    M = rng.standard_normal((r1, r1)) + 3 * np.eye(r1)
    if np.linalg.cond(M) > 1e6:
        return
    want = subspace_similarity(A1, A2, r1, r2)
    assert abs(subspace_similarity(M @ A1, A2, r1, r2) - want) < 1e-8


def test_invertible_mixing_changes_top_directions():
    """…but not the top-i directions: M = diag(1, 10) makes e₂ the top direction of M·A."""
    A = np.diag([3.0, 1.0]) @ np.eye(2, 5)  # top right-singular vector e₁
    M = np.diag([1.0, 10.0])  # M·A = diag(3, 10): top right-singular vector e₂
    assert subspace_similarity(M @ A, A, 2, 2) == pytest.approx(1.0)
    assert subspace_similarity(M @ A, A, 1, 1) == pytest.approx(0.0, abs=1e-15)


def test_known_shared_directions():
    """A₁, A₂ on orthonormal V with m shared leading directions: φ = min(i, j, m)/min(i, j)."""
    rng = np.random.default_rng(0)
    V, _ = np.linalg.qr(rng.standard_normal((20, 10)))
    m = 3
    V1 = V[:, :6]  # directions 0..5
    V2 = np.concatenate([V[:, :m], V[:, 6:10]], axis=1)  # 0..2 shared, then 6..9
    A1 = np.diag(np.linspace(6, 1, 6)) @ V1.T  # decreasing σ keep the order
    A2 = np.diag(np.linspace(7, 1, 7)) @ V2.T
    grid = subspace_similarity_grid(A1, A2)
    for i in range(1, 7):
        for j in range(1, 8):
            assert grid[i - 1, j - 1] == pytest.approx(min(i, j, m) / min(i, j), abs=1e-12)


def test_bad_inputs():
    A = np.ones((2, 4))
    with pytest.raises(ValueError, match="i"):
        subspace_similarity(A, A, 0, 1)
    with pytest.raises(ValueError, match="j"):
        subspace_similarity(A, A, 1, 3)
    with pytest.raises(ValueError, match="A2"):
        subspace_similarity(A, np.ones((2, 5)), 1, 1)
    with pytest.raises(ValueError, match="A"):
        right_singular_basis(np.ones(3))
    with pytest.raises(ValueError, match="A"):
        right_singular_basis(np.ones((5, 3)))
