"""Composition of LoRA adapters: exactness, cross terms, Eckart–Young, learnable weights, PEFT.

Expected values come from dense algebra written out here (Σ wᵢsᵢBᵢAᵢ by loops), from a
construction with known singular values, from finite differences (gradcheck), or from
HF PEFT's add_weighted_adapter — never from the function under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor
from minipeft.peft.compose import (
    combine_cat,
    combine_linear,
    combine_svd,
    linear_cross_terms,
    task_arithmetic,
    weighted_lora_sum,
)


def dense_sum(adapters, weights):
    out = np.zeros((adapters[0][1].shape[0], adapters[0][0].shape[1]))
    for w, (A, B, s) in zip(weights, adapters):
        out += w * s * (B @ A)
    return out


@st.composite
def adapter_sets(draw, equal_ranks=False):
    n = draw(st.integers(1, 4))
    d_in, d_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    r0 = draw(st.integers(1, 5))
    ranks = [r0] * n if equal_ranks else [draw(st.integers(1, 5)) for _ in range(n)]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    adapters = [
        (rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), rng.uniform(0.1, 3))
        for r in ranks
    ]
    weights = [draw(st.floats(-2, 2, allow_nan=False)) for _ in range(n)]
    return adapters, weights


@given(adapter_sets())
def test_cat_is_exact_and_ranks_add(data):
    adapters, weights = data
    A, B, s = combine_cat(adapters, weights)
    assert s == 1.0
    assert A.shape[0] == B.shape[1] == sum(a[0].shape[0] for a in adapters)
    np.testing.assert_allclose(s * B @ A, dense_sum(adapters, weights), rtol=1e-12, atol=1e-12)


@given(adapter_sets(equal_ranks=True))
def test_linear_equals_exact_plus_cross_terms(data):
    adapters, weights = data
    A, B, s = combine_linear(adapters, weights)
    # the cross terms written out: Σ_{i≠j} √|c_j| · sign(c_i)√|c_i| · B_j A_i,  c = w·s
    c = [w * ad[2] for w, ad in zip(weights, adapters)]
    cross = np.zeros_like(dense_sum(adapters, weights))
    for i, (Ai, _, _) in enumerate(adapters):
        for j, (_, Bj, _) in enumerate(adapters):
            if i != j:
                sign_i = 1.0 if c[i] >= 0 else -1.0
                cross += np.sqrt(abs(c[j])) * sign_i * np.sqrt(abs(c[i])) * (Bj @ Ai)
    np.testing.assert_allclose(linear_cross_terms(adapters, weights), cross, atol=1e-12)
    np.testing.assert_allclose(
        s * B @ A, dense_sum(adapters, weights) + cross, rtol=1e-10, atol=1e-10
    )


def test_linear_cross_terms_are_not_small():
    """Two random adapters, weights ½, ½: the cross terms are as large as the wanted sum."""
    rng = np.random.default_rng(0)
    adapters = [(rng.standard_normal((4, 16)), rng.standard_normal((16, 4)), 1.0) for _ in range(2)]
    A, B, _ = combine_linear(adapters, [0.5, 0.5])
    want = dense_sum(adapters, [0.5, 0.5])
    rel = np.linalg.norm(B @ A - want) / np.linalg.norm(want)
    assert rel > 0.5
    # with one adapter there are no cross terms: linear is exact
    A1, B1, _ = combine_linear(adapters[:1], [0.8])
    np.testing.assert_allclose(B1 @ A1, dense_sum(adapters[:1], [0.8]), atol=1e-12)


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_svd_error_is_the_tail_of_known_singular_values(k):
    """ΔW* = U diag(σ) Vᵀ built from known σ and split across three adapters."""
    rng = np.random.default_rng(k)
    sigma = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    U, V = _orthonormal(rng, 10, 6), _orthonormal(rng, 12, 6)
    # adapter i holds singular triplets 2i, 2i+1 with weight w and scaling s: w·s·B·A = part
    adapters, weights = [], [2.0, -0.5, 1.5]
    for i, w in enumerate(weights):
        sl = slice(2 * i, 2 * i + 2)
        s = 0.5 + i
        adapters.append((V[:, sl].T, U[:, sl] * sigma[sl] / (w * s), s))
    (A, B, s), S = combine_svd(adapters, weights, k)
    np.testing.assert_allclose(S[:6], sigma, rtol=1e-12)  # S has min(out, in) = 10 values
    assert np.all(np.abs(S[6:]) < 1e-12)
    err = B @ A - U @ np.diag(sigma) @ V.T
    np.testing.assert_allclose(np.linalg.norm(err), np.sqrt((sigma[k:] ** 2).sum()), atol=1e-12)
    spectral = np.linalg.norm(err, 2)
    np.testing.assert_allclose(spectral, sigma[k] if k < 6 else 0.0, atol=1e-12)
    assert A.shape == (k, 12) and B.shape == (10, k)
    np.testing.assert_allclose(A @ A.T, np.eye(k), atol=1e-12)  # A = V_kᵀ has orthonormal rows


def test_svd_beats_any_other_rank_k_candidate():
    """Eckart–Young: truncated SVD is no worse than the cat-then-drop or random candidates."""
    rng = np.random.default_rng(1)
    adapters = [(rng.standard_normal((3, 8)), rng.standard_normal((7, 3)), 1.0) for _ in range(2)]
    w = [1.0, 0.7]
    want = dense_sum(adapters, w)
    (A, B, _), _ = combine_svd(adapters, w, 3)
    best = np.linalg.norm(B @ A - want)
    Ac, Bc, _ = combine_cat(adapters, w)
    assert best <= np.linalg.norm(Bc[:, :3] @ Ac[:3] - want)
    for _ in range(20):
        X, Y = rng.standard_normal((7, 3)), rng.standard_normal((3, 8))
        # the best B for a fixed A = Y is a least-squares fit; still no better than the SVD
        Bls = want @ np.linalg.pinv(Y)
        assert best <= np.linalg.norm(Bls @ Y - want) + 1e-12
        assert best <= np.linalg.norm(X @ Y - want)


def test_task_arithmetic_adds_and_removes_skills():
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((5, 6))
    adapters = [(rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), 2.0) for _ in range(2)]
    x = rng.standard_normal((3, 6))
    merged = task_arithmetic(W0, adapters, [1.0, 0.5])
    per_adapter = x @ W0.T + sum(
        w * s * (x @ A.T) @ B.T for w, (A, B, s) in zip([1.0, 0.5], adapters)
    )
    np.testing.assert_allclose(x @ merged.T, per_adapter, rtol=1e-12)
    added = task_arithmetic(W0, adapters[:1], [1.0])
    removed = task_arithmetic(added, adapters[:1], [-1.0])  # negation undoes the skill
    np.testing.assert_allclose(removed, W0, atol=1e-13)


def test_learnable_weights_gradcheck_and_forward():
    rng = np.random.default_rng(3)
    adapters = [
        (rng.standard_normal((r, 5)), rng.standard_normal((4, r)), 0.5 * r) for r in (1, 3, 2)
    ]
    x = rng.standard_normal((2, 3, 5))  # (B, T, in)
    lam = np.array([0.4, -1.1, 0.7])
    res = gradcheck(lambda x, lam: weighted_lora_sum(x, lam, adapters), [x, lam])
    assert res.max_rel_error < 1e-6
    y = weighted_lora_sum(Tensor(x), Tensor(lam), adapters).data
    np.testing.assert_allclose(y, x @ dense_sum(adapters, lam).T, rtol=1e-12, atol=1e-12)


def test_learnable_weights_skip_frozen_input_gradient():
    rng = np.random.default_rng(4)
    adapters = [(rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), 1.0) for _ in range(2)]
    x = Tensor(rng.standard_normal((3, 5)))  # no gradient wanted for x
    lam = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    weighted_lora_sum(x, lam, adapters).sum().backward()
    assert x.grad is None and lam.grad.shape == (2,)
    # ∂/∂λᵢ of Σ y = sᵢ·Σ (x Aᵢᵀ Bᵢᵀ), written out
    want = [s * (x.data @ A.T @ B.T).sum() for A, B, s in adapters]
    np.testing.assert_allclose(lam.grad, want, rtol=1e-12)


def test_bad_inputs():
    A, B = np.zeros((2, 3)), np.zeros((4, 2))
    with pytest.raises(ValueError, match="adapters"):
        combine_cat([], [])
    with pytest.raises(ValueError, match="weights"):
        combine_cat([(A, B, 1.0)], [1.0, 2.0])
    with pytest.raises(ValueError, match="adapters"):
        combine_cat([(A, np.zeros((4, 3)), 1.0)])
    with pytest.raises(ValueError, match="adapters"):
        combine_linear([(A, B, 1.0), (np.zeros((3, 3)), np.zeros((4, 3)), 1.0)], [1, 1])
    with pytest.raises(ValueError, match="rank"):
        combine_svd([(A, B, 1.0)], [1.0], 0)
    with pytest.raises(ValueError, match="rank"):
        combine_svd([(A, B, 1.0)], [1.0], 4)
    with pytest.raises(ValueError, match="weight"):
        task_arithmetic(np.zeros((3, 4)), [(A, B, 1.0)])
    with pytest.raises(ValueError, match="lam"):
        weighted_lora_sum(Tensor(np.zeros((1, 3))), Tensor(np.zeros(2)), [(A, B, 1.0)])
    with pytest.raises(TypeError, match="x, lam"):
        weighted_lora_sum(np.zeros((1, 3)), Tensor(np.zeros(1)), [(A, B, 1.0)])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_against_peft_add_weighted_adapter(use_rslora):
    """Our cat / linear / svd factors equal the ones HF PEFT writes into the new adapter."""
    torch = pytest.importorskip("torch", reason="torch not installed: PEFT cross-check skipped")
    peft = pytest.importorskip("peft", reason="peft not installed: PEFT cross-check skipped")

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5)).double()

    def cfg(r, alpha):
        return peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False,
            use_rslora=use_rslora,
        )  # fmt: skip

    model = peft.get_peft_model(base, cfg(2, 4), "t0")
    model.add_adapter("t1", cfg(2, 3))
    layer = model.base_model.model[0]
    names = ["t0", "t1"]
    adapters = [
        (
            layer.lora_A[n].weight.detach().numpy().copy(),
            layer.lora_B[n].weight.detach().numpy().copy(),
            float(layer.scaling[n]),
        )
        for n in names
    ]
    w = [0.7, -1.3]
    ours = {
        "cat": combine_cat(adapters, w),
        "linear": combine_linear(adapters, w),
        "svd": combine_svd(adapters, w, 3)[0],
    }
    for ct, (A, B, _) in ours.items():
        kwargs = {"svd_rank": 3} if ct == "svd" else {}
        model.add_weighted_adapter(names, w, f"m_{ct}", combination_type=ct, **kwargs)
        pA = layer.lora_A[f"m_{ct}"].weight.detach().numpy()
        pB = layer.lora_B[f"m_{ct}"].weight.detach().numpy()
        # PEFT builds the weights of `linear` and `svd` as float32 tensors (torch.tensor of
        # Python floats), so those coefficients carry float32 rounding: rtol 1e-6 there.
        rtol = 1e-12 if ct == "cat" else 1e-6
        if ct == "svd":  # singular vectors are defined up to sign: compare the product
            np.testing.assert_allclose(pB @ pA, B @ A, rtol=rtol, atol=1e-12)
        else:
            np.testing.assert_allclose(pA, A, rtol=rtol, atol=1e-14)
            np.testing.assert_allclose(pB, B, rtol=rtol, atol=1e-14)
        if not use_rslora:  # new adapter has lora_alpha = r, so scaling 1 as ours
            assert layer.scaling[f"m_{ct}"] == 1.0
    # cat is exact in PEFT too, without rsLoRA
    if not use_rslora:
        dW = layer.get_delta_weight("m_cat").detach().numpy()
        np.testing.assert_allclose(dW, dense_sum(adapters, w), rtol=1e-12, atol=1e-14)
