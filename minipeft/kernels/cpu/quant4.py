"""Numba kernels for blockwise 4-bit quantization, equal bit for bit to the NumPy reference.

The reference is ``minipeft.quant.blockwise`` (``quantize_4bit(..., kernel="numpy")``);
these loops do the same float32 operations in the same order, one block at a time:

    c_b = max |x_i|                      (a short last block: max(c_b, 1e-38))
    s_i = x_i · fl(1/max(c_b, 1e-38))    (short last block: x_i / max(c_b, 1e-38))
    s_i = clamp(s_i, −1, 1)
    k_i = #{m ∈ midpoints : m < s_i}     bucket among the sorted levels (ties stay low)
    q_i = order[k_i]                     the nearest level's code
    byte_j = q_{2j} << 4 | q_{2j+1}      high nibble first; an odd count padded with the
                                         code of 0
    x̂_i = code[q_i] · c_b              dequantization (float32)

``@njit(cache=True)``; with ``NUMBA_DISABLE_JIT=1`` the same functions run as Python on
NumPy float32 scalars and give the same bytes (tested).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["dequantize_4bit", "quantize_4bit"]

_TINY = np.float32(1e-38)


@njit(cache=True)
def _bucket(s: np.float32, mids: np.ndarray) -> int:  # pragma: no cover - compiled
    """k = #{m_j < s}: s ≤ m_j stays below, so ties go to the lower level."""
    if mids.shape[0] == 15:  # 16 levels: a 4-step binary search, m_{k−1} < s ≤ m_k
        k = 8 if s > mids[7] else 0
        k += 4 if s > mids[k + 3] else 0
        k += 2 if s > mids[k + 1] else 0
        k += 1 if s > mids[k] else 0
        return k
    k = 0
    for j in range(mids.shape[0]):
        if s > mids[j]:
            k += 1
    return k


@njit(cache=True)
def _scale(
    x: np.float32, short: bool, safe: np.float32, recip: np.float32
) -> np.float32:  # pragma: no cover - compiled
    s = x / safe if short else x * recip  # s = x·fl(1/c); a short block divides (as bnb)
    one = np.float32(1.0)
    if s > one:
        return one
    if s < -one:
        return -one
    return s


@njit(cache=True)
def _quantize_kernel(  # pragma: no cover - compiled
    flat: np.ndarray,
    blocksize: int,
    mids: np.ndarray,
    order: np.ndarray,
    pad_code: np.uint8,
    packed: np.ndarray,
    absmax: np.ndarray,
) -> None:
    n = flat.shape[0]
    n_blocks = absmax.shape[0]
    one = np.float32(1.0)
    tiny = np.float32(1e-38)
    for b in range(n_blocks):
        start = b * blocksize
        end = min(start + blocksize, n)
        am = np.float32(0.0)
        for i in range(start, end):
            a = abs(flat[i])
            if a > am:
                am = a  # c_b = max |x_i|
        short = end - start < blocksize
        safe = am if am > tiny else tiny  # zero block: 1e-38, no NaN
        absmax[b] = safe if short else am  # bnb stores the clamped value for a short block
        recip = one / safe  # fl(1/c_b)
        # blocksize is even, so a byte never straddles two blocks
        for i in range(start, end, 2):
            hi = order[_bucket(_scale(flat[i], short, safe, recip), mids)]
            lo = pad_code  # odd count: the last byte is padded with the code of 0
            if i + 1 < end:
                lo = order[_bucket(_scale(flat[i + 1], short, safe, recip), mids)]
            packed[i // 2] = np.uint8((np.int64(hi) << 4) | np.int64(lo))  # first: high nibble


@njit(cache=True)
def _dequantize_kernel(  # pragma: no cover - compiled
    packed: np.ndarray,
    absmax: np.ndarray,
    code: np.ndarray,
    blocksize: int,
    n: int,
    out: np.ndarray,
) -> None:
    n_blocks = absmax.shape[0]
    for b in range(n_blocks):
        scale = absmax[b]
        start = b * blocksize
        end = min(start + blocksize, n)
        for i in range(start, end - 1, 2):  # whole bytes (start is even)
            byte = np.int64(packed[i >> 1])
            out[i] = code[byte >> 4] * scale  # x̂ = code[q]·c_b, high nibble first
            out[i + 1] = code[byte & 15] * scale
        if (end - start) % 2:  # odd n: the last byte's high nibble only
            out[end - 1] = code[np.int64(packed[(end - 1) >> 1]) >> 4] * scale


def quantize_4bit(
    flat: np.ndarray, blocksize: int, mids: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 ((n+1)//2,), absmax float32 (n_blocks,)) for a flat float32 array."""
    flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
    mids = np.ascontiguousarray(mids, dtype=np.float32)
    order = np.ascontiguousarray(order, dtype=np.uint8)
    if blocksize % 2:
        raise ValueError(f"blocksize: expected an even size, got {blocksize}")
    n = flat.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)
    pad_code = np.uint8(order[int(np.searchsorted(mids, np.float32(0.0), side="left"))])
    _quantize_kernel(flat, np.int64(blocksize), mids, order, pad_code, packed, absmax)
    return packed, absmax


def dequantize_4bit(
    packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, n: int
) -> np.ndarray:
    """x̂ (float32 (n,)) from packed codes and per-block float32 absmax."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    absmax = np.ascontiguousarray(absmax, dtype=np.float32)
    code = np.ascontiguousarray(code, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    _dequantize_kernel(packed, absmax, code, np.int64(blocksize), np.int64(n), out)
    return out
