# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Attention: forward, derived backward, every term checked
#
# Follows **lecture 23, §3.6 "Boss Battle", Steps 1–4** (the attention layer and its
# backward pass), with the corrections of `ERRATA.md` item 8. The derivation is
# `derivations/attention.md`; the code is `minipeft/nn/attention.py`; the registered checks
# are `python -m minipeft verify attention`.
#
# One convention throughout (row-major, as PyTorch and HF PEFT): X is (n, d_model), one row
# per token; a weight W is (out, in); a projection is Q = X·W_qᵀ. Every gradient below is
# compared with float64 central differences and the cell ends with an assertion.
#
# It runs on the NumPy backend by default; `MINIPEFT_BACKEND=cupy` runs minipeft's tensors on
# a GPU. The float64 references below stay in NumPy (they are the independent check), and
# minipeft's results come back to the host explicitly (`.numpy()`, `to_numpy`) to meet them.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

import minipeft
from minipeft import tensor
from minipeft.backend import to_numpy
from minipeft.nn.attention import (
    attention_grad_k,
    attention_grad_p,
    attention_grad_q,
    attention_grad_v,
    attention_weights,
    scaled_dot_product_attention,
    softmax_grad_s,
)
from minipeft.verify import run, select

print("backend:", minipeft.get_backend())
rng = np.random.default_rng(0)
n, d_model, d = 6, 8, 4  # tokens, model width, head size (one head here)
EPS = 1e-6


def central_diff(f, x):
    """∂f/∂x entry by entry in float64: (f(x + εe) − f(x − εe)) / 2ε."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + EPS
        up = f(x)
        x[idx] = old - EPS
        down = f(x)
        x[idx] = old
        g[idx] = (up - down) / (2 * EPS)
    return g


# %% [markdown]
# ## Step 1 — the shapes, fixed
#
# The lecture writes Q = W_q·X with X ∈ ℝ^{n×d} and W_q ∈ ℝ^{d×d_k}. That product is
# (d × d_k)·(n × d): it exists only when d_k = n. NumPy agrees:

# %%
X = rng.standard_normal((n, d_model))
W_q_lecture = rng.standard_normal((d_model, d))  # ℝ^{d×d_k} as in the lecture
try:
    W_q_lecture @ X
    composed = True
except ValueError as exc:
    composed = False
    print("W_q·X:", exc)
assert not composed

# %% [markdown]
# In the row-major convention each projection is a Linear layer with weight (out, in):
# Q = X·W_qᵀ, K = X·W_kᵀ, V = X·W_vᵀ, all (n, d). Then S = Q·Kᵀ/√d is (n, n), P = softmax(S)
# row by row, O = P·V is (n, d).

# %%
W_q, W_k, W_v = (rng.standard_normal((d, d_model)) / math.sqrt(d_model) for _ in range(3))
Q, K, V = X @ W_q.T, X @ W_k.T, X @ W_v.T  # (n, d) each


def softmax_rows(S):
    e = np.exp(S - S.max(axis=-1, keepdims=True))  # shift by the row max: no overflow
    return e / e.sum(axis=-1, keepdims=True)


S = Q @ K.T / math.sqrt(d)  # (n, n)
P = softmax_rows(S)  # (n, n), rows sum to 1
O = P @ V  # (n, d)

# minipeft's fused op on the same numbers, as a (B=1, H=1) batch
O_mp = scaled_dot_product_attention(
    tensor(Q[None, None]), tensor(K[None, None]), tensor(V[None, None]), causal=False
).numpy()[0, 0]
np.testing.assert_allclose(O_mp, O, rtol=1e-12)

# %% [markdown]
# ## Step 4 — the backward, one term at a time
#
# Take a scalar loss L = Σ G ⊙ O for a fixed random G, so the upstream gradient is
# dO = ∂L/∂O = G. Notation: dA := ∂L/∂A has A's shape; if a perturbation δA changes L by
# ⟨M, δA⟩ (Frobenius product) then dA = M.
#
# **dV = Pᵀ·dO** `[attention.grad_V]` — O = P·V is linear in V:
# ⟨dO, P·δV⟩ = ⟨Pᵀ·dO, δV⟩.

# %%
G = rng.standard_normal((n, d))  # dO
dO = G

dV = attention_grad_v(P, dO)  # Pᵀ·dO, (n, d)
fd_V = central_diff(lambda V_: np.sum(G * (softmax_rows(Q @ K.T / math.sqrt(d)) @ V_)), V)
np.testing.assert_allclose(dV, P.T @ dO, rtol=1e-14)
np.testing.assert_allclose(dV, fd_V, rtol=1e-6, atol=1e-9)

# %% [markdown]
# **dP = dO·Vᵀ** `[attention.grad_P]` — treat P as the variable:
# ⟨dO, δP·V⟩ = ⟨dO·Vᵀ, δP⟩.

# %%
dP = attention_grad_p(dO, V)  # dO·Vᵀ, (n, n)
fd_P = central_diff(lambda P_: np.sum(G * (P_ @ V)), P)
np.testing.assert_allclose(dP, fd_P, rtol=1e-6, atol=1e-9)

# %% [markdown]
# **Through the softmax** `[attention.grad_S]` — this is the step the lecture skips. For one
# row p = softmax(s): ∂pⱼ/∂sₗ = pⱼ([j = l] − pₗ), i.e. J = diag(p) − p·pᵀ. First the Jacobian
# of one row against finite differences:

# %%
s0, p0 = S[2], P[2]
J = np.diag(p0) - np.outer(p0, p0)
J_fd = np.stack(
    [central_diff(lambda s_, j=j: softmax_rows(s_[None])[0, j], s0) for j in range(n)]
)  # row j = ∇ₛ pⱼ
np.testing.assert_allclose(J, J_fd, rtol=1e-6, atol=1e-9)
np.testing.assert_allclose(J, J.T)  # symmetric, so the VJP is J·dp

# %% [markdown]
# J is symmetric, so dsₗ = Σⱼ dpⱼ·Jⱼₗ = pₗ(dpₗ − ⟨dp, p⟩), and for all rows at once
#
# $$dS = P \odot \big(dP - \mathrm{rowsum}(dP \odot P)\big).$$
#
# No n × n Jacobian per row is ever formed. Each row of dS sums to 0: adding a constant to a
# row of S does not change P.

# %%
dS = softmax_grad_s(P, dP)
fd_S = central_diff(lambda S_: np.sum(G * (softmax_rows(S_) @ V)), S)
np.testing.assert_allclose(dS, P * (dP - (dP * P).sum(axis=-1, keepdims=True)), rtol=1e-14)
np.testing.assert_allclose(dS, np.stack([J_r @ g for J_r, g in zip(
    [np.diag(p) - np.outer(p, p) for p in P], dP)]), rtol=1e-12, atol=1e-14)  # fmt: skip
np.testing.assert_allclose(dS, fd_S, rtol=1e-6, atol=1e-9)
np.testing.assert_allclose(dS.sum(axis=-1), 0.0, atol=1e-14)

# %% [markdown]
# **dQ = dS·K/√d** `[attention.grad_Q]` and **dK = dSᵀ·Q/√d** `[attention.grad_K]`, from
# δS = (δQ·Kᵀ + Q·δKᵀ)/√d.

# %%
dQ = attention_grad_q(dS, K, 1 / math.sqrt(d))
dK = attention_grad_k(dS, Q, 1 / math.sqrt(d))


def loss_qkv(Q_, K_, V_):
    return np.sum(G * (softmax_rows(Q_ @ K_.T / math.sqrt(d)) @ V_))


np.testing.assert_allclose(dQ, central_diff(lambda Q_: loss_qkv(Q_, K, V), Q), rtol=1e-6, atol=1e-9)
np.testing.assert_allclose(dK, central_diff(lambda K_: loss_qkv(Q, K_, V), K), rtol=1e-6, atol=1e-9)

# %% [markdown]
# ### What goes wrong without the softmax step (ERRATA 8)
#
# The lecture's Step 4 writes ∂L/∂Q = (1/√d)·∂L/∂S·K — correct once ∂L/∂S is known — but
# never derives ∂L/∂S. The gradient that reaches the attention matrix is dP; using it in
# place of dS gives a dQ that is wrong by several times its own size:

# %%
dQ_skip_softmax = dP @ K / math.sqrt(d)
rel = np.abs(dQ_skip_softmax - dQ).max() / np.abs(dQ).max()
print(f"error of dQ when the softmax backward is skipped: {rel:.1f}× the size of the true dQ")
assert rel > 1.0

# %% [markdown]
# ## Back to the weights (the rest of Step 4)
#
# With Q = X·W_qᵀ: dW_q = dQᵀ·X and dX = dQ·W_q + dK·W_k + dV·W_v. The lecture's LoRA
# gradients, in this convention (Q = X·W_qᵀ + s·(X·Aᵀ)·Bᵀ, A (r, d_model), B (d, r)):
# dB = s·dQᵀ·(X·Aᵀ) and dA = s·(dQ·B)ᵀ·X (registered in `derivations/lora.md`).

# %%
r, s_lora = 2, 0.5
A, B = rng.standard_normal((r, d_model)), rng.standard_normal((d, r))


def loss_weights(W_q_, A_, B_, X_):
    Q_ = X_ @ W_q_.T + s_lora * (X_ @ A_.T) @ B_.T
    return loss_qkv(Q_, X_ @ W_k.T, X_ @ W_v.T)


Q_l = X @ W_q.T + s_lora * (X @ A.T) @ B.T
P_l = softmax_rows(Q_l @ K.T / math.sqrt(d))
dS_l = softmax_grad_s(P_l, attention_grad_p(dO, V))
dQ_l = attention_grad_q(dS_l, K, 1 / math.sqrt(d))
dK_l = attention_grad_k(dS_l, Q_l, 1 / math.sqrt(d))
dV_l = attention_grad_v(P_l, dO)

dW_q = dQ_l.T @ X  # (d, d_model), the layout of W_q
dB = s_lora * dQ_l.T @ (X @ A.T)  # (d, r)
dA = s_lora * (dQ_l @ B).T @ X  # (r, d_model)
dX = dQ_l @ (W_q + s_lora * B @ A) + dK_l @ W_k + dV_l @ W_v  # (n, d_model)

checks = {
    "dW_q": (dW_q, central_diff(lambda w: loss_weights(w, A, B, X), W_q)),
    "dB": (dB, central_diff(lambda b: loss_weights(W_q, A, b, X), B)),
    "dA": (dA, central_diff(lambda a: loss_weights(W_q, a, B, X), A)),
    "dX": (dX, central_diff(lambda x: loss_weights(W_q, A, B, x), X)),
}
for name, (analytic, fd) in checks.items():
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8, err_msg=name)
print("dW_q, dB, dA, dX match central differences")

# %% [markdown]
# ## The fused Function
#
# minipeft's `scaled_dot_product_attention` is one Function: its backward is exactly the
# five equations above (batched over (B, H)), and it skips every term whose input needs no
# gradient (a frozen V costs no dV; frozen Q and K cost no dP, dS).

# %%
tq, tk, tv = (tensor(a[None, None], requires_grad=True) for a in (Q, K, V))
scaled_dot_product_attention(tq, tk, tv, causal=False).backward(G[None, None])
for name, mine, ours in (("dQ", tq.grad, dQ), ("dK", tk.grad, dK), ("dV", tv.grad, dV)):
    np.testing.assert_allclose(to_numpy(mine)[0, 0], ours, rtol=1e-12, atol=1e-14, err_msg=name)

results = run(select("attention"))
for res in results:
    print(f"{res.equation.id:18s} error {res.error:.1e}  tol {res.equation.tol:.0e}")
assert results and all(res.passed for res in results)

# %% [markdown]
# ## Causal attention with a prefix
#
# Prefix tuning puts P trainable key/value vectors in front of the n real keys. Causal
# attention then has Tk = P + n keys for Tq = n queries, and query i (at position P + i)
# sees key j iff j ≤ i + (Tk − Tq) = i + P: every query sees the whole prefix. Below, the
# last real token is padding (a key-padding mask), so its column is empty: no query attends
# to it.

# %%
n_prefix = 3
prefix_k = rng.standard_normal((n_prefix, d))
K_all = np.concatenate([prefix_k, K])  # (P + n, d)
key_mask = np.ones(n_prefix + n, dtype=bool)
key_mask[-1] = False  # the last real token is padding
P_heat = attention_weights(
    Q[None, None], K_all[None, None], causal=True, attn_mask=key_mask[None, None, None, :]
)[0, 0]  # (n, P + n)

i, j = np.arange(n)[:, None], np.arange(n_prefix + n)[None, :]
visible = (j <= i + n_prefix) & key_mask
assert np.all(P_heat[~visible] == 0) and np.all(P_heat[visible] > 0)
np.testing.assert_allclose(P_heat.sum(axis=-1), 1.0, rtol=1e-12)

fig, ax = plt.subplots(figsize=(6, 4))
im = ax.imshow(P_heat, cmap="viridis", vmin=0)
ax.axvline(n_prefix - 0.5, color="white", lw=1.5, ls="--")
ax.set_xticks(range(n_prefix + n), [f"p{t}" for t in range(n_prefix)] + [f"x{t}" for t in range(n)])
ax.set_yticks(range(n), [f"x{t}" for t in range(n)])
ax.set_xlabel("key (prefix | tokens; x5 is padding)")
ax.set_ylabel("query")
ax.set_title("P: causal attention with a 3-vector prefix")
fig.colorbar(im, ax=ax)
plt.show()

# %% [markdown]
# A query that may attend to no key at all (possible only with an explicit mask) gets a
# row of zeros in P, output 0 and zero gradients — never NaN (see the derivation, §2 and §5).

# %%
none_visible = np.zeros((n, n), dtype=bool)
none_visible[:, 0] = True
none_visible[3] = False  # query 3 sees nothing
tq = tensor(Q[None, None], requires_grad=True)
out = scaled_dot_product_attention(
    tq, tensor(K[None, None]), tensor(V[None, None]), causal=False, attn_mask=none_visible
)
out.backward(G[None, None])
out_h, grad_h = out.numpy()[0, 0], to_numpy(tq.grad)[0, 0]  # (n, d) each, on the host
assert np.all(out_h[3] == 0) and np.all(grad_h[3] == 0)
assert np.all(np.isfinite(out_h)) and np.all(np.isfinite(grad_h))
