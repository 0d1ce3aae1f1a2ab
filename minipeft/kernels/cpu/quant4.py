"""Numba kernels for blockwise 4-bit quantization, equal bit for bit to the NumPy reference.

The reference is ``minipeft.quant.blockwise`` (``quantize_4bit(..., impl="reference")``);
these loops do the same float32 operations in the same order, one block at a time:

    c_b = max |x_i|                      (a short last block: max(c_b, 1e-38))
    s_i = x_i · fl(1/max(c_b, 1e-38))    (short last block: x_i / max(c_b, 1e-38))
    s_i = clamp(s_i, −1, 1)
    k_i = #{m ∈ midpoints : m < s_i}     bucket among the sorted levels (ties stay low)
    q_i = order[k_i]                     the nearest level's code
    byte_j = q_{2j} << 4 | q_{2j+1}      high nibble first; an odd count padded with the
                                         code of 0
    x̂_i = code[q_i] · c_b              dequantization (float32)

How the loops are made fast without changing a bit (one block at a time, in L1):

- c_b as the maximum of the int32 bit patterns with the sign bit cleared: for finite
  floats that order is the order of |x|, and an integer max reduction vectorizes (a float
  one would need fast-math).
- the bucket k without a branch: q = order[0] + Σ_j [s > m_j]·(order[j+1] − order[j]), the
  15 midpoints in registers; [s > m_j] is monotone in j (sorted midpoints), so the sum
  telescopes to order[k] exactly, with the same strict comparison (ties stay low). The
  clamp to [−1, 1] is skipped: no midpoint lies outside (−1, 1), so it changes no count.
- dequantization through the block's 16-entry table t = code·c_b (the same float32
  product as code[q]·c_b), two nibbles per byte; on x86 with AVX2/AVX-512 the lookups are
  register permutes (``simd.make_dequant_chunk``) and the pairs are interleaved in
  registers, so a block is a few vector instructions.

``@njit(cache=True)``; with ``NUMBA_DISABLE_JIT=1`` the same functions run as Python on
NumPy float32 scalars and give the same bytes (tested).
"""

from __future__ import annotations

import types as types_mod
from typing import Any

import numpy as np
from numba import njit

from .simd import make_dequant_chunk, simd_width

__all__ = ["dequantize_4bit", "quantize_4bit"]


@njit(cache=True, boundscheck=False)
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
    z = np.int32(0)
    bits = flat.view(np.int32)  # |x| ordered as its bits: max over int32 is exact, vectorizes
    abits = absmax.view(np.int32)
    # the 15 sorted midpoints in registers, and the code steps d_j = order[j+1] − order[j]:
    # q = order[k] = order[0] + Σ_{j<k} d_j = order[0] + Σ_j [s > m_j]·d_j  (monotone in j)
    m0, m1, m2, m3, m4 = mids[0], mids[1], mids[2], mids[3], mids[4]
    m5, m6, m7, m8, m9 = mids[5], mids[6], mids[7], mids[8], mids[9]
    m10, m11, m12, m13, m14 = mids[10], mids[11], mids[12], mids[13], mids[14]
    d = np.empty(15, np.int32)
    for j in range(15):
        d[j] = np.int32(order[j + 1]) - np.int32(order[j])
    d0, d1, d2, d3, d4, d5, d6, d7 = d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
    d8, d9, d10, d11, d12, d13, d14 = d[8], d[9], d[10], d[11], d[12], d[13], d[14]
    base = np.int32(order[0])
    s = np.empty(blocksize, np.float32)  # scaled block
    q = np.empty(blocksize, np.int32)  # its codes
    for b in range(n_blocks):
        start = b * blocksize
        end = min(start + blocksize, n)
        cnt = end - start
        mb = z
        for i in range(start, end):
            mb = max(mb, bits[i] & np.int32(0x7FFFFFFF))  # c_b = max |x_i|
        abits[b] = mb
        am = absmax[b]
        safe = am if am > tiny else tiny  # zero block: 1e-38, no NaN
        if cnt < blocksize:
            absmax[b] = safe  # bnb stores the clamped value for a short block
            for i in range(cnt):
                s[i] = flat[start + i] / safe  # short block: s = x / c (as bnb)
        else:
            recip = one / safe  # fl(1/c_b)
            for i in range(cnt):
                s[i] = flat[start + i] * recip  # s = x·fl(1/c_b)
        # clamp(s, −1, 1) changes no count: every midpoint lies inside (−1, 1)
        for i in range(cnt):
            v = s[i]
            q[i] = (  # k = #{m_j < s}: s ≤ m_j stays below, so ties go to the lower level
                base
                + (d0 if v > m0 else z)
                + (d1 if v > m1 else z)
                + (d2 if v > m2 else z)
                + (d3 if v > m3 else z)
                + (d4 if v > m4 else z)
                + (d5 if v > m5 else z)
                + (d6 if v > m6 else z)
                + (d7 if v > m7 else z)
                + (d8 if v > m8 else z)
                + (d9 if v > m9 else z)
                + (d10 if v > m10 else z)
                + (d11 if v > m11 else z)
                + (d12 if v > m12 else z)
                + (d13 if v > m13 else z)
                + (d14 if v > m14 else z)
            )
        p0 = start >> 1  # blocksize is even: a byte never straddles two blocks
        for t in range(cnt >> 1):
            packed[p0 + t] = np.uint8((q[2 * t] << 4) | q[2 * t + 1])  # first: high nibble
        if cnt & 1:  # odd count: the last byte is padded with the code of 0
            packed[p0 + (cnt >> 1)] = np.uint8((q[cnt - 1] << 4) | np.int32(pad_code))


@njit(cache=True, boundscheck=False)
def _dequantize_kernel(  # pragma: no cover - compiled
    packed: np.ndarray,
    absmax: np.ndarray,
    code: np.ndarray,
    blocksize: int,
    n: int,
    out: np.ndarray,
    b0: int,
) -> None:
    """Blocks b0, b0+1, …: portable loop over the block's 16-entry table."""
    n_blocks = absmax.shape[0]
    t = np.empty(16, np.float32)
    for b in range(b0, n_blocks):
        scale = absmax[b]
        for k in range(16):
            t[k] = code[k] * scale  # the block's table: x̂ = code[q]·c_b, same product
        start = b * blocksize
        end = min(start + blocksize, n)
        o = out[start:end]
        p = packed[start >> 1 : (end + 1) >> 1]
        for j in range(o.shape[0] >> 1):  # whole bytes (start is even)
            byte = np.uint32(p[j])
            o[2 * j] = t[byte >> np.uint32(4)]  # high nibble first
            o[2 * j + 1] = t[byte & np.uint32(15)]
        if o.shape[0] & 1:  # odd n: the last byte's high nibble only
            o[o.shape[0] - 1] = t[np.uint32(p[o.shape[0] >> 1]) >> np.uint32(4)]


_WIDTH = simd_width()
_LANES = _WIDTH if _WIDTH else 8  # lanes of the module's SIMD kernel (compiled only if used)
_deq_chunk = make_dequant_chunk(_LANES)


def _dequantize_simd_py(  # pragma: no cover - compiled
    packed: np.ndarray,
    absmax: np.ndarray,
    code: np.ndarray,
    blocksize: int,
    n: int,
    out: np.ndarray,
) -> None:
    """Full blocks by register permutes (_WIDTH bytes → 2·_WIDTH values per step), the
    short last block by the portable loop; the same products t = code·c_b either way."""
    width = _LANES
    n_full = n // blocksize
    bb = blocksize // 2  # bytes per block, a multiple of width (B ≥ 32)
    for b in range(n_full):
        c = absmax[b]
        for j in range(0, bb, width):
            _deq_chunk(out, b * blocksize + 2 * j, packed, b * bb + j, code, c)
    _dequantize_kernel(packed, absmax, code, blocksize, n, out, n_full)


_dequantize_simd = njit(cache=True, boundscheck=False)(_dequantize_simd_py)


def make_dequantize_simd(width: int) -> Any:
    """The same kernel for another lane count (tests run the AVX2 one on AVX-512 CPUs)."""
    glb = {**globals(), "_LANES": width, "_deq_chunk": make_dequant_chunk(width)}
    fn = types_mod.FunctionType(_dequantize_simd_py.__code__, glb, f"_dequantize_simd_{width}")
    return njit(cache=False, boundscheck=False)(fn)


def quantize_4bit(
    flat: np.ndarray, blocksize: int, mids: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 ((n+1)//2,), absmax float32 (n_blocks,)) for a flat float32 array."""
    flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
    mids = np.ascontiguousarray(mids, dtype=np.float32)
    order = np.ascontiguousarray(order, dtype=np.uint8)
    if blocksize % 2:
        raise ValueError(f"blocksize: expected an even size, got {blocksize}")
    if mids.shape != (15,) or order.shape != (16,):
        raise ValueError(f"mids, order: expected (15,) and (16,), got {mids.shape}, {order.shape}")
    n = flat.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)
    pad_code = np.uint8(order[int(np.searchsorted(mids, np.float32(0.0), side="left"))])
    _quantize_kernel(flat, np.int64(blocksize), mids, order, pad_code, packed, absmax)
    return packed, absmax


def dequantize_4bit(
    packed: np.ndarray,
    absmax: np.ndarray,
    code: np.ndarray,
    blocksize: int,
    n: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """x̂ (float32 (n,)) from packed codes and per-block float32 absmax.

    out: an optional contiguous float32 (n,) buffer to write into (a reused workspace skips
    the page faults of a fresh 4·n-byte allocation, which dominate at this size).
    """
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    absmax = np.ascontiguousarray(absmax, dtype=np.float32)
    code = np.ascontiguousarray(code, dtype=np.float32)
    if code.shape != (16,):
        raise ValueError(f"code: expected a (16,) table, got shape {code.shape}")
    if out is None:
        out = np.empty(n, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (n,) or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a contiguous float32 ({n},), got {out.dtype} {out.shape}")
    if _WIDTH and blocksize % (2 * _WIDTH) == 0:
        _dequantize_simd(packed, absmax, code, np.int64(blocksize), np.int64(n), out)
    else:
        _dequantize_kernel(packed, absmax, code, np.int64(blocksize), np.int64(n), out, 0)
    return out
