"""Registered checks for scaled dot-product attention (derivations/attention.md).

Every check compares minipeft with something minipeft did not compute: a direct NumPy
loop over (batch, head, query) that builds the visible keys of each query by hand, and
float64 central differences of that loop. The example has a causal mask with a 2-key
prefix (Tk − Tq = 2), a random boolean mask, and one query row that sees no key at all
(its output and gradients must be exactly 0).

Errors are relative to the largest entry: max|a − b| / max|b|.
"""

from __future__ import annotations

import math

import numpy as np

from ...autograd.tensor import Tensor
from ...nn.attention import (
    attention_grad_k,
    attention_grad_p,
    attention_grad_q,
    attention_grad_v,
    scaled_dot_product_attention,
    softmax_grad_s,
)
from .. import Outcome, equation

B, H, TQ, TK, D = 2, 2, 3, 5, 4  # two prefix keys: TK − TQ = 2
EPS = 1e-6  # central-difference step (float64)


def _example() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240611)
    mask = rng.random((B, 1, TQ, TK)) > 0.25  # True = may attend
    mask[1, 0, 0, :] = False  # batch 1, query 0 may attend to nothing (every head)
    i = np.arange(TQ)[:, None]
    j = np.arange(TK)[None, :]
    causal = j <= i + (TK - TQ)  # (TQ, TK), written out independently of minipeft
    return {
        "q": rng.standard_normal((B, H, TQ, D)),
        "k": rng.standard_normal((B, H, TK, D)),
        "v": rng.standard_normal((B, H, TK, D)),
        "attn_mask": mask,
        "visible": np.broadcast_to(causal & mask, (B, H, TQ, TK)).copy(),
        "cotangent": rng.standard_normal((B, H, TQ, D)),  # dO: L = Σ dO ⊙ O
    }


def _softmax_rows_loop(s: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """P row by row over the visible keys only; a row with no visible key is 0."""
    p = np.zeros_like(s)
    for idx in np.ndindex(*s.shape[:-1]):
        cols = np.flatnonzero(visible[idx])
        if cols.size:
            e = np.exp(s[idx][cols] - s[idx][cols].max())
            p[idx][cols] = e / e.sum()
    return p


def _attention_loop(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray):
    """O = softmax(Q·Kᵀ/√d over the visible keys)·V, one query at a time."""
    s = np.zeros(visible.shape)
    for b, h, i, j in np.ndindex(*visible.shape):
        s[b, h, i, j] = q[b, h, i] @ k[b, h, j] / math.sqrt(q.shape[-1])
    p = _softmax_rows_loop(s, visible)
    o = np.zeros((*q.shape[:-1], v.shape[-1]))
    for b, h, i in np.ndindex(*q.shape[:-1]):
        o[b, h, i] = sum(p[b, h, i, j] * v[b, h, j] for j in range(v.shape[-2]))
    return o, s, p


def _central_diff(f, x: np.ndarray) -> np.ndarray:
    """∂f/∂x entry by entry: (f(x + εe) − f(x − εe)) / 2ε, float64."""
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


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _fused_grads(ex: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    q, k, v = (Tensor(ex[n], requires_grad=True) for n in ("q", "k", "v"))
    o = scaled_dot_product_attention(q, k, v, causal=True, attn_mask=ex["attn_mask"])
    o.backward(ex["cotangent"])
    return o.data, q.grad, k.grad, v.grad


def _loss_fd(ex: dict[str, np.ndarray], name: str) -> np.ndarray:
    """∂L/∂(q, k or v) of L = Σ dO ⊙ O(q, k, v) by central differences of the NumPy loop."""
    args = {n: ex[n] for n in ("q", "k", "v")}

    def loss(x: np.ndarray) -> float:
        o, _, _ = _attention_loop(**{**args, name: x}, visible=ex["visible"])
        return float(np.sum(ex["cotangent"] * o))

    return _central_diff(loss, ex[name])


@equation(
    "attention.forward",
    what="O = softmax(Q·Kᵀ/√d + M)·V, causal offset Tk − Tq, masks, empty rows → 0",
    derivation="attention.md",
    implements=scaled_dot_product_attention,
    tol=1e-12,
)
def _check_forward() -> Outcome:
    ex = _example()
    o_ref, _, p_ref = _attention_loop(ex["q"], ex["k"], ex["v"], ex["visible"])
    o = scaled_dot_product_attention(
        Tensor(ex["q"]), Tensor(ex["k"]), Tensor(ex["v"]), causal=True, attn_mask=ex["attn_mask"]
    ).data
    # causal=True and attn_mask (True = may attend) together give "visible"
    arrays = {n: ex[n] for n in ("q", "k", "v", "attn_mask", "visible")}
    return Outcome(error=_rel(o, o_ref), arrays={**arrays, "p": p_ref, "o": o})


@equation(
    "attention.grad_V",
    what="dV = Pᵀ·dO",
    derivation="attention.md",
    implements=attention_grad_v,
    tol=1e-6,
)
def _check_grad_v() -> Outcome:
    ex = _example()
    _, _, _, dv = _fused_grads(ex)
    fd = _loss_fd(ex, "v")
    arrays = {n: ex[n] for n in ("q", "k", "v", "attn_mask", "cotangent")}
    return Outcome(error=_rel(dv, fd), arrays={**arrays, "grad_v": dv})


@equation(
    "attention.grad_P",
    what="dP = dO·Vᵀ",
    derivation="attention.md",
    implements=attention_grad_p,
    tol=1e-6,
)
def _check_grad_p() -> Outcome:
    ex = _example()
    _, _, p = _attention_loop(ex["q"], ex["k"], ex["v"], ex["visible"])
    dp = attention_grad_p(ex["cotangent"], ex["v"])
    fd = _central_diff(lambda pp: float(np.sum(ex["cotangent"] * (pp @ ex["v"]))), p)
    return Outcome(
        error=_rel(dp, fd), arrays={"p": p, "v": ex["v"], "cotangent": ex["cotangent"], "dp": dp}
    )


@equation(
    "attention.grad_S",
    what="softmax backward dS = P ⊙ (dP − rowsum(dP ⊙ P))",
    derivation="attention.md",
    implements=softmax_grad_s,
    tol=1e-6,
)
def _check_grad_s() -> Outcome:
    ex = _example()
    _, s, p = _attention_loop(ex["q"], ex["k"], ex["v"], ex["visible"])
    dp = np.random.default_rng(7).standard_normal(s.shape)  # any upstream dP
    ds = softmax_grad_s(p, dp)
    fd = _central_diff(lambda ss: float(np.sum(dp * _softmax_rows_loop(ss, ex["visible"]))), s)
    return Outcome(
        error=_rel(ds, fd), arrays={"s": s, "visible": ex["visible"], "p": p, "dp": dp, "ds": ds}
    )


@equation(
    "attention.grad_Q",
    what="dQ = dS·K/√d",
    derivation="attention.md",
    implements=attention_grad_q,
    tol=1e-6,
)
def _check_grad_q() -> Outcome:
    ex = _example()
    _, dq, _, _ = _fused_grads(ex)
    fd = _loss_fd(ex, "q")
    arrays = {n: ex[n] for n in ("q", "k", "v", "attn_mask", "cotangent")}
    return Outcome(error=_rel(dq, fd), arrays={**arrays, "grad_q": dq})


@equation(
    "attention.grad_K",
    what="dK = dSᵀ·Q/√d",
    derivation="attention.md",
    implements=attention_grad_k,
    tol=1e-6,
)
def _check_grad_k() -> Outcome:
    ex = _example()
    _, _, dk, _ = _fused_grads(ex)
    fd = _loss_fd(ex, "k")
    arrays = {n: ex[n] for n in ("q", "k", "v", "attn_mask", "cotangent")}
    return Outcome(error=_rel(dk, fd), arrays={**arrays, "grad_k": dk})
