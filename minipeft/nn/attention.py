"""Scaled dot-product attention (placeholder: composition of primitive ops).

The fused Function with the derived backward replaces this body; the signature is fixed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..autograd import ops
from ..autograd.tensor import Tensor

__all__ = ["scaled_dot_product_attention"]


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

    With ``causal``, query i (of the last Tq positions) sees key j iff j ≤ i + (Tk − Tq):
    the first Tk − Tq keys (prefix-tuning's virtual tokens) are visible to every query.
    ``attn_mask``: boolean array broadcastable to (B, H, Tq, Tk), True = may attend.
    """
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(d))  # (B, H, Tq, Tk)
    blocked = np.zeros((tq, tk), dtype=bool)
    if causal:
        blocked = np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1)
    if attn_mask is not None:
        blocked = blocked | ~np.asarray(attn_mask, dtype=bool)
    if blocked.any():
        s = ops.masked_fill(s, np.broadcast_to(blocked, s.shape), -np.inf)
    p = ops.softmax(s, axis=-1)
    p = ops.dropout(p, dropout_p, training)
    return ops.matmul(p, v)  # (B, H, Tq, d)
