"""Scaled dot-product attention as one fused Function, and multi-head attention.

Convention (derivations/attention.md): row-major, one row per token. For one (batch, head)
slice, Q is (Tq, d), K is (Tk, d), V is (Tk, d_v), and

    S = Q·Kᵀ/√d + M          (Tq, Tk)   M = 0 where the query may attend, −∞ elsewhere
    P = softmax(S) row-wise  (Tq, Tk)
    O = P·V                  (Tq, d_v)

The backward is derived in closed form (never by composing the primitive ops):

    dV = Pᵀ·dO                                   [attention.grad_V]
    dP = dO·Vᵀ                                   [attention.grad_P]
    dS = P ⊙ (dP − rowsum(dP ⊙ P))               [attention.grad_S]
    dQ = dS·K/√d                                 [attention.grad_Q]
    dK = dSᵀ·Q/√d                                [attention.grad_K]

Each equation is one small array function below, named in its docstring; the Function's
backward calls them and skips every one whose input does not need a gradient.

Masks. ``causal`` lets query i (of the last Tq positions) see key j iff j ≤ i + (Tk − Tq),
so the first Tk − Tq keys (prefix tuning's virtual tokens, or a KV cache) are visible to
every query. ``attn_mask`` is boolean, True = may attend, broadcastable to (B, H, Tq, Tk);
a key-padding mask (B, Tk) enters as ``attn_mask[:, None, None, :]``
(``key_padding_to_attn_mask``).

Fully-masked rows. A query row that may attend to no key has softmax(−∞, …, −∞) = 0/0.
minipeft defines that row of P as all zeros: its output row is 0 and it passes no
gradient to Q, K or V (dS = P ⊙ (…) = 0). No NaN appears, deterministically. (PyTorch
2.13's CPU ``scaled_dot_product_attention`` returns the same zeros and zero gradients; a
naive softmax gives NaN.) With ``causal`` and Tk ≥ Tq every row sees key 0, so only
``attn_mask`` can produce such a row.

``attention_reference`` keeps the same computation as a composition of primitive ops
(matmul, masked_fill, softmax, dropout); tests check the fused op against it, against
float64 finite differences and against a direct NumPy loop.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.ops import unbroadcast
from ..autograd.tensor import Function, Tensor, as_tensor, is_grad_enabled
from ..backend import Array
from .layers import Linear
from .module import Module

__all__ = [
    "MultiHeadAttention", "ScaledDotProductAttention", "attention_grad_k", "attention_grad_p",
    "attention_grad_q", "attention_grad_v", "attention_mask", "attention_reference",
    "attention_weights", "key_padding_to_attn_mask", "merge_heads", "scaled_dot_product_attention",
    "softmax_grad_s", "split_heads",
]  # fmt: skip


# ---------------------------------------------------------------------------- masks
def _mask_array(name: str, mask: Any, xp: Any) -> Array:
    """A boolean array from a bool or 0/1 integer mask (a Tensor's data is used)."""
    if isinstance(mask, Tensor):
        mask = mask.data
    arr = xp.asarray(mask)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iu":
        if arr.size and bool(((arr != 0) & (arr != 1)).any()):
            raise ValueError(f"{name}: an integer mask must hold only 0 and 1 (1 = may attend)")
        return arr.astype(bool)
    raise TypeError(
        f"{name}: expected a boolean (or 0/1 integer) mask with True = may attend, got dtype "
        f"{arr.dtype} (an additive float mask is not accepted)"
    )


def attention_mask(
    tq: int, tk: int, *, causal: bool, attn_mask: Any = None, xp: Any = np
) -> Array | None:
    """The boolean *blocked* array (True = may NOT attend), or None when nothing is masked.

    Its shape is (Tq, Tk) for a causal mask alone, else the broadcast of (Tq, Tk) with
    ``attn_mask``'s shape. Causal: query i sees key j iff j ≤ i + (Tk − Tq).
    """
    if causal and tk < tq:
        raise ValueError(
            f"causal: needs at least as many keys as queries (Tk ≥ Tq), got Tq={tq}, Tk={tk}"
        )
    blocked = None
    if causal and tq > 0 and tk - tq + 1 < tk:
        # blocked[i, j] = j > i + (Tk − Tq): strictly above the diagonal shifted by the offset
        blocked = xp.triu(xp.ones((tq, tk), dtype=bool), k=tk - tq + 1)  # (Tq, Tk)
    if attn_mask is not None:
        allowed = _mask_array("attn_mask", attn_mask, xp)
        if allowed.ndim > 4 or allowed.ndim < 1:
            raise ValueError(
                f"attn_mask: expected 1 to 4 dimensions broadcastable to (B, H, {tq}, {tk}), "
                f"got shape {tuple(allowed.shape)}"
            )
        if allowed.shape[-1] not in (1, tk) or (
            allowed.ndim >= 2 and allowed.shape[-2] not in (1, tq)
        ):
            raise ValueError(
                f"attn_mask: shape {tuple(allowed.shape)} does not broadcast to (B, H, {tq}, {tk})"
            )
        blocked = ~allowed if blocked is None else blocked | ~allowed
    return blocked


def key_padding_to_attn_mask(mask: Array) -> Array:
    """(B, Tk) key-padding mask (True/1 = real token) → (B, 1, 1, Tk) boolean attn_mask."""
    if isinstance(mask, Tensor):
        mask = mask.data
    arr = _mask_array("mask", mask, backend.xp_of(mask))
    if arr.ndim != 2:
        raise ValueError(f"mask: expected a key-padding mask of shape (B, Tk), got {arr.shape}")
    return arr[:, None, None, :]  # (B, 1, 1, Tk)


# ---------------------------------------------------------------------------- the equations
def masked_softmax_rows(s: Array, blocked: Array | None) -> Array:
    """P = softmax(S + M) along the last axis, stable; fully-masked rows give P = 0.

    Works in place on ``s`` (a fresh score array) and returns it. Part of [attention.forward].
    """
    xp = backend.xp_of(s)
    if blocked is not None:
        xp.copyto(s, -xp.inf, where=blocked)  # S_ij = −∞ where query i may not see key j
    m = s.max(axis=-1, keepdims=True)  # (…, Tq, 1) row maximum
    if blocked is not None:
        m[~xp.isfinite(m)] = 0  # a fully-masked row: any finite shift, every entry stays −∞
    s -= m  # S − max S: every exponent ≤ 0, no overflow
    xp.exp(s, out=s)  # e^{S − m}; e^{−∞} = 0
    z = s.sum(axis=-1, keepdims=True)  # (…, Tq, 1) Σ_j e^{S_ij − m_i}
    if blocked is not None:
        z[z == 0] = 1  # a fully-masked row: 0/1 = 0 instead of 0/0
    s /= z  # P = e^{S − m} / Σ e^{S − m}
    return s


def attention_grad_v(p: Array, g: Array) -> Array:
    """dV = Pᵀ·dO, batched over the leading axes.   [attention.grad_V]

    ``p`` is the matrix that multiplied V in the forward (P, or P ⊙ dropout mask).
    """
    return p.swapaxes(-1, -2) @ g  # (…, Tk, Tq)·(…, Tq, d_v) → (…, Tk, d_v)


def attention_grad_p(g: Array, v: Array) -> Array:
    """dP = dO·Vᵀ.   [attention.grad_P]"""
    return g @ v.swapaxes(-1, -2)  # (…, Tq, d_v)·(…, d_v, Tk) → (…, Tq, Tk)


def softmax_grad_s(p: Array, dp: Array) -> Array:
    """dS = P ⊙ (dP − rowsum(dP ⊙ P)), the softmax backward, row by row.   [attention.grad_S]

    This is (diag(p) − p pᵀ)·dp for each row p of P (the Jacobian is symmetric). Masked
    entries have P = 0, so dS = 0 there; a fully-masked row (P = 0) gives dS = 0.
    """
    xp = backend.xp_of(p, dp)
    r = xp.einsum("...j,...j->...", dp, p)[..., None]  # rowsum(dP ⊙ P), (…, Tq, 1)
    ds = dp - r  # dP − rowsum(dP ⊙ P)
    ds *= p  # P ⊙ (dP − rowsum(dP ⊙ P))
    return ds


def attention_grad_q(ds: Array, k: Array, scale: float) -> Array:
    """dQ = dS·K/√d (``scale`` = 1/√d).   [attention.grad_Q]"""
    dq = ds @ k  # (…, Tq, Tk)·(…, Tk, d) → (…, Tq, d)
    dq *= scale
    return dq


def attention_grad_k(ds: Array, q: Array, scale: float) -> Array:
    """dK = dSᵀ·Q/√d (``scale`` = 1/√d).   [attention.grad_K]"""
    dk = ds.swapaxes(-1, -2) @ q  # (…, Tk, Tq)·(…, Tq, d) → (…, Tk, d)
    dk *= scale
    return dk


# ---------------------------------------------------------------------------- fused Function
class ScaledDotProductAttention(Function):
    """O = softmax(Q·Kᵀ/√d + M)·V with the derived backward.   [attention.forward]

    forward:  S = (Q/√d)·Kᵀ, S_ij = −∞ where blocked, P = softmax(S) (stable, fully-masked
              rows → 0), P̃ = P ⊙ m/(1 − p) with m ~ Bernoulli(1 − p) in training, O = P̃·V
    backward: dV = P̃ᵀ·dO,  dP̃ = dO·Vᵀ,  dP = dP̃ ⊙ m/(1 − p),
              dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = dS·K/√d,  dK = dSᵀ·Q/√d
    Only what a needed gradient uses is saved, and nothing is computed for an input that
    does not need a gradient (a frozen V skips dV; frozen Q and K skip dP and dS).
    """

    def forward(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        scale: float,
        blocked: Array | None,
        dropout_p: float,
        rng: np.random.Generator,
    ) -> Array:
        xp = backend.xp_of(q, k, v)
        # S = (Q/√d)·Kᵀ — scaling Q (Tq·d entries) is cheaper than scaling S (Tq·Tk)
        s = (q * q.dtype.type(scale)) @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk)
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        if tuple(s.shape[:-2]) != lead:  # only v is wider in (B, H): P takes O's batch shape
            s = xp.broadcast_to(s, (*lead, *s.shape[-2:])).copy()  # (B, H, Tq, Tk)
        p = masked_softmax_rows(s, blocked)  # P = softmax(S + M), in place on s
        drop = None
        if dropout_p >= 1.0:
            drop = xp.zeros(p.shape, dtype=p.dtype)  # everything dropped: P̃ = 0
        elif dropout_p > 0.0:
            # the same draw as ops.dropout, so a seeded run matches attention_reference
            keep = rng.random(p.shape) >= dropout_p
            drop = xp.asarray(keep, dtype=p.dtype) * p.dtype.type(1.0 / (1.0 - dropout_p))
        pd = p if drop is None else p * drop  # P̃ = P ⊙ m/(1 − p)
        o = pd @ v  # O = P̃·V, (B, H, Tq, d_v)

        need_q, need_k, need_v = self.needs_input_grad
        if is_grad_enabled() and (need_q or need_k or need_v):
            self.scale, self.shapes = scale, (q.shape, k.shape, v.shape)
            self.pd = pd if need_v else None  # for dV = P̃ᵀ·dO
            if need_q or need_k:  # dS needs P, V (for dP) and the dropout mask
                self.p, self.v, self.drop = p, v, drop
                self.q = q if need_k else None  # dK = dSᵀ·Q/√d
                self.k = k if need_q else None  # dQ = dS·K/√d
        return o

    def backward(self, g: Array) -> tuple[Array | None, Array | None, Array | None]:
        need_q, need_k, need_v = self.needs_input_grad
        sq, sk, sv = self.shapes
        dq = dk = dv = None
        if need_v:
            dv = unbroadcast(attention_grad_v(self.pd, g), sv)  # dV = P̃ᵀ·dO
        if need_q or need_k:
            dp = attention_grad_p(g, self.v)  # dP̃ = dO·Vᵀ
            if self.drop is not None:
                dp *= self.drop  # dP = dP̃ ⊙ m/(1 − p)
            ds = softmax_grad_s(self.p, dp)  # dS = P ⊙ (dP − rowsum(dP ⊙ P))
            if need_q:
                dq = unbroadcast(attention_grad_q(ds, self.k, self.scale), sq)  # dS·K/√d
            if need_k:
                dk = unbroadcast(attention_grad_k(ds, self.q, self.scale), sk)  # dSᵀ·Q/√d
        return dq, dk, dv


def _validate(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name}: expected shape (B, H, T, d), got {t.shape}")
        if t.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head size d={q.shape[-1]} (as q), got shape {k.shape}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v: expected Tk={k.shape[-2]} positions (as k), got shape {v.shape}")
    try:
        np.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2])
    except ValueError:
        raise ValueError(
            f"q, k, v: leading (B, H) axes do not broadcast: {q.shape}, {k.shape}, {v.shape}"
        ) from None
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1], got {dropout_p}")


def _score_shape(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    lead = np.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2])
    return (*lead, q.shape[-2], k.shape[-2])


def _check_mask_shape(blocked: Array | None, shape: tuple[int, ...]) -> None:
    if blocked is not None and np.broadcast_shapes(tuple(blocked.shape), shape) != shape:
        raise ValueError(
            f"attn_mask: shape {tuple(blocked.shape)} does not broadcast to the scores' {shape}"
        )


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """softmax(Q·Kᵀ/√d + mask)·V for q (B, H, Tq, d), k and v (B, H, Tk, d), Tk ≥ Tq.

    [attention.forward] — one fused Function (``ScaledDotProductAttention``) whose backward
    is the closed form of derivations/attention.md.

    With ``causal``, query i (of the last Tq positions) sees key j iff j ≤ i + (Tk − Tq):
    the first Tk − Tq keys (prefix-tuning's virtual tokens) are visible to every query.
    ``attn_mask``: boolean array broadcastable to (B, H, Tq, Tk), True = may attend.
    Dropout with probability ``dropout_p`` is applied to P only when ``training``.
    The leading (B, H) axes of q, k, v broadcast (k, v may be shared: (1, H, Tk, d)).
    A query row with no visible key returns 0 and passes no gradient (never NaN).
    """
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    _validate(q, k, v, dropout_p)
    xp = backend.xp_of(q.data, k.data, v.data)
    blocked = attention_mask(q.shape[-2], k.shape[-2], causal=causal, attn_mask=attn_mask, xp=xp)
    _check_mask_shape(blocked, _score_shape(q, k, v))
    p = float(dropout_p) if training else 0.0
    return ScaledDotProductAttention.apply(
        q,
        k,
        v,
        scale=1.0 / math.sqrt(q.shape[-1]),
        blocked=blocked,
        dropout_p=p,
        rng=backend.rng_like(q.data),  # the mask is drawn where the scores live
    )


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """The same attention composed of primitive ops (autograd derives its backward).

    Kept as the second opinion the fused Function is checked against: same signature,
    same masks, the same dropout draw from ``backend.rng_like(q)``, and the same convention for
    fully-masked rows (their scores are left finite, then P is multiplied by 0 there).
    """
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    _validate(q, k, v, dropout_p)
    xp = backend.xp_of(q.data, k.data, v.data)
    blocked = attention_mask(q.shape[-2], k.shape[-2], causal=causal, attn_mask=attn_mask, xp=xp)
    shape = _score_shape(q, k, v)
    _check_mask_shape(blocked, shape)
    d = q.shape[-1]
    s = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(d))  # (B, H, Tq, Tk)
    if s.shape != shape:  # q narrower than k/v in (B, H): broadcast the scores
        s = s + Tensor(xp.zeros(shape, dtype=s.dtype))
    dead = None
    if blocked is not None:
        blocked = xp.broadcast_to(blocked, shape)
        dead = blocked.all(axis=-1, keepdims=True)  # rows with no visible key, (B, H, Tq, 1)
        s = ops.masked_fill(s, blocked & ~dead, -np.inf)
    p = ops.softmax(s, axis=-1)
    if dead is not None and bool(dead.any()):
        p = p * Tensor(xp.asarray(~dead, dtype=p.dtype))  # fully-masked rows → 0
    p = ops.dropout(p, dropout_p, training)
    return ops.matmul(p, v)  # (B, H, Tq, d_v)


def attention_weights(q: Any, k: Any, *, causal: bool = True, attn_mask: Any = None) -> np.ndarray:
    """P = softmax(Q·Kᵀ/√d + M) as a NumPy array (no graph, no dropout), for inspection."""
    qa = q.data if isinstance(q, Tensor) else q
    ka = k.data if isinstance(k, Tensor) else k
    xp = backend.xp_of(qa, ka)
    blocked = attention_mask(qa.shape[-2], ka.shape[-2], causal=causal, attn_mask=attn_mask, xp=xp)
    s = (qa * (1.0 / math.sqrt(qa.shape[-1]))) @ ka.swapaxes(-1, -2)
    if blocked is not None:
        s = s + xp.zeros(np.broadcast_shapes(tuple(s.shape), tuple(blocked.shape)), dtype=s.dtype)
    return backend.to_numpy(masked_softmax_rows(s, blocked))


# ---------------------------------------------------------------------------- multi-head
def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, H·d) → (B, H, T, d): head h takes the features h·d … (h + 1)·d − 1."""
    b, t, c = x.shape
    if c % n_heads:
        raise ValueError(f"x: last dimension {c} is not divisible by n_heads={n_heads}")
    x = ops.reshape(x, (b, t, n_heads, c // n_heads))  # (B, T, H, d)
    return ops.transpose(x, (0, 2, 1, 3))  # (B, H, T, d)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) → (B, T, H·d), the inverse of ``split_heads``."""
    b, h, t, d = x.shape
    x = ops.transpose(x, (0, 2, 1, 3))  # (B, T, H, d)
    return ops.reshape(x, (b, t, h * d))  # (B, T, H·d)


def _expand_batch(name: str, t: Any, b: int, n_heads: int, d: int) -> Tensor:
    """A prefix (B or 1, H, P, d) as a (B, H, P, d) tensor (a (1, …) one is shared)."""
    t = as_tensor(t)
    if t.ndim != 4 or t.shape[1] != n_heads or t.shape[3] != d or t.shape[0] not in (1, b):
        raise ValueError(f"{name}: expected shape ({b} or 1, {n_heads}, P, {d}), got {t.shape}")
    if t.shape[0] == b:
        return t
    # broadcasting add: its backward sums the gradient over the batch into the shared prefix
    return t + Tensor(backend.xp_of(t.data).zeros((b, 1, 1, 1), dtype=t.dtype))


class MultiHeadAttention(Module):
    """Multi-head self-attention with separate q/k/v projections (BERT's names).

    Submodules (Hugging Face BERT names, Linear (out, in) layout):
      ``query``, ``key``, ``value``  — BertSelfAttention's projections, d_model → d_model;
      ``dense``                       — the output projection (BertSelfOutput.dense), present
                                        only with ``output_projection=True``.
    With ``output_projection=False`` the module is exactly HF's ``attention.self`` and its
    state dict loads ``…attention.self.{query,key,value}.{weight,bias}`` unchanged.

    forward(x (B, T, d_model), attention_mask=None, prefix_k=None, prefix_v=None):
      Q = x·W_qᵀ + b_q, K = x·W_kᵀ + b_k, V = x·W_vᵀ + b_v, split into H heads of size
      d = d_model/H; prefix keys/values (B or 1, H, P, d) are placed before the token keys;
      O = attention(Q, [P_k; K], [P_v; V]); heads merged, then ``dense``.
      ``attention_mask`` (B, T) or (B, P + T): True/1 = real token (key padding); with a
      prefix and a (B, T) mask the P prefix positions are marked visible, as HF PEFT does.
      ``causal`` (constructor default, overridable per call): token i sees the prefix and
      tokens ≤ i.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        bias: bool = True,
        causal: bool = False,
        dropout: float = 0.0,
        output_projection: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(n_heads, int) or n_heads <= 0:
            raise ValueError(f"n_heads: expected a positive integer, got {n_heads!r}")
        if not isinstance(d_model, int) or d_model <= 0 or d_model % n_heads:
            raise ValueError(
                f"d_model: expected a positive multiple of n_heads={n_heads}, got {d_model!r}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal, self.dropout = bool(causal), float(dropout)
        self.query = Linear(d_model, d_model, bias)
        self.key = Linear(d_model, d_model, bias)
        self.value = Linear(d_model, d_model, bias)
        self.dense = Linear(d_model, d_model, bias) if output_projection else None

    def forward(
        self,
        x: Tensor,
        attention_mask: Any = None,
        *,
        prefix_k: Any = None,
        prefix_v: Any = None,
        causal: bool | None = None,
    ) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {x.shape}")
        if (prefix_k is None) != (prefix_v is None):
            raise ValueError("prefix_k, prefix_v: give both or neither")
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q = split_heads(self.query(x), h)  # (B, H, T, d)
        k = split_heads(self.key(x), h)  # (B, H, T, d)
        v = split_heads(self.value(x), h)  # (B, H, T, d)
        n_prefix = 0
        if prefix_k is not None:
            pk = _expand_batch("prefix_k", prefix_k, b, h, d)  # (B, H, P, d)
            pv = _expand_batch("prefix_v", prefix_v, b, h, d)  # (B, H, P, d)
            if pk.shape != pv.shape:
                raise ValueError(
                    f"prefix_v: expected shape {pk.shape} (as prefix_k), got {pv.shape}"
                )
            n_prefix = pk.shape[2]
            k = ops.concat([pk, k], axis=2)  # (B, H, P + T, d)
            v = ops.concat([pv, v], axis=2)  # (B, H, P + T, d)
        mask = None
        if attention_mask is not None:
            xp = backend.xp_of(x.data)
            m = _mask_array("attention_mask", attention_mask, xp)
            if m.ndim != 2 or m.shape[0] != b or m.shape[1] not in (t, n_prefix + t):
                raise ValueError(
                    f"attention_mask: expected shape ({b}, {t}) or ({b}, {n_prefix + t}), "
                    f"got {tuple(m.shape)}"
                )
            if m.shape[1] == t and n_prefix:
                m = xp.concatenate([xp.ones((b, n_prefix), dtype=bool), m], axis=1)  # (B, P + T)
            mask = key_padding_to_attn_mask(m)  # (B, 1, 1, P + T)
        o = scaled_dot_product_attention(
            q,
            k,
            v,
            causal=self.causal if causal is None else bool(causal),
            attn_mask=mask,
            dropout_p=self.dropout,
            training=self.training,
        )  # (B, H, T, d)
        o = merge_heads(o)  # (B, T, d_model)
        return self.dense(o) if self.dense is not None else o

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
            f"dropout={self.dropout}"
        )
