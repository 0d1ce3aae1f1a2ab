"""Fused 4-bit GEMV: y = Ŵ·x from the packed codes, without materializing Ŵ. [qlora.gemv4]

W (out, in) was quantized row-major over the flat array (``quantize_4bit``); element (r, i)
is flat item f = r·in + i, its code the high nibble of byte f//2 when f is even, the low
nibble when odd, its scale the block constant c_{f//B}:

    ŵ_ri = code[q_f] · c_{f//B}                     (dequantization, never stored)
    y_r  = Σ_i ŵ_ri · x_i                           (float32 accumulation)

When ``in`` is a multiple of the block size B and of 8·lanes (every Linear with
in ∈ {768, 1024, 4096, …}), rows hold whole blocks and the SIMD kernel reads the codes as
32-bit words, lane k holding weights 8k…8k+7 of a group of 8·lanes weights: for each of
the 8 nibble positions a shift brings it to the low bits and a register permute
(``vpermps``, which reads only the index's low bits: one on AVX-512, two and a select on
bit 3 on AVX2) looks up code[q] for all lanes at once; an FMA multiplies by x, regrouped
once per call so that nibble position e of lane k meets x_{8k+e}. The block scales are
applied once per group (a permute spreads the row's c_b over the lanes), four independent
accumulators hide the FMA latency. Emitted as a Numba intrinsic (``simd.make_gemv_group``).
Elsewhere (other CPUs, ``NUMBA_DISABLE_JIT=1``, other shapes) a portable Numba loop
computes the same sum.

Double quantization: the block scales are reconstructed on the fly, one row at a time,
c_b = fl32(fl32(code₂[q_b]·absmax₂[b//256]) + μ), the same float32 operations as
``double_dequantize`` (no ``contract`` flag, so no FMA) — so the scales are bit-identical
and nothing of size n_blocks is allocated per call.

Accuracy: float32 products and sums in a different order from a float64 reference;
|y_r − Σ_i ŵ_ri x_i| ≤ γ_{in+2}·Σ_i |ŵ_ri x_i| with γ_k = k·u/(1 − k·u), u = 2⁻²⁴
(checked by ``qlora.gemv4`` in ``minipeft/verify/checks/qlora_kernels.py``).
"""

from __future__ import annotations

import types as types_mod
from typing import Any

import numpy as np
from numba import njit

from .simd import make_gemv_group, simd_width

__all__ = ["gemv_4bit", "gemv_4bit_reference", "simd_width"]

_IMPLS = ("reference", "numba", "cuda")
# reassociation lets the sums vectorize; no "contract": nothing is fused behind our back (the
# double-quant scale stays bit-identical to double_dequantize; the kernel's FMAs are explicit)
_FAST = {"reassoc", "nsz", "nnan", "ninf", "arcp"}


# ----------------------------------------------------------------------- NumPy reference
def gemv_4bit_reference(
    packed: np.ndarray, scales: np.ndarray, code: np.ndarray, blocksize: int, shape: tuple, x: Any
) -> np.ndarray:
    """y = Ŵ·x by dequantizing Ŵ (float32) then a float32 matrix-vector product.

    The readable definition the kernels are tested against (it materializes Ŵ).
    """
    out_f, in_f = shape
    n = out_f * in_f
    q = np.empty(packed.size * 2, dtype=np.uint8)
    q[0::2] = packed >> 4  # first element: high nibble
    q[1::2] = packed & 0x0F
    scale = np.repeat(np.asarray(scales, dtype=np.float32), blocksize)[:n]  # c_b per element
    w_hat = (code[q[:n]] * scale).reshape(out_f, in_f)  # ŵ = code[q]·c_b   (out, in)
    return w_hat @ np.asarray(x, dtype=np.float32)  # y = Ŵ·x   (out,) or (out, B)


# ----------------------------------------------------------------------- Numba kernels
@njit(cache=True, inline="always")
def _row_scales(  # pragma: no cover - compiled
    b0: int,
    nb: int,
    absmax: np.ndarray,
    nested: bool,
    qabs: np.ndarray,
    absmax2: np.ndarray,
    code2: np.ndarray,
    offset: np.float32,
    dq_bs: int,
    out: np.ndarray,
) -> None:
    """out[j] = c_{b0+j}; double-quantized: fl32(fl32(code₂[q]·absmax₂[b//256]) + μ)."""
    if nested:
        b2, rem = b0 // dq_bs, b0 % dq_bs  # second-level block of b, counted up (no division)
        for j in range(nb):
            out[j] = code2[np.int64(qabs[b0 + j])] * absmax2[b2] + offset  # ĉ = code₂[q]·a₂ + μ
            rem += 1
            if rem == dq_bs:
                b2, rem = b2 + 1, 0
    else:
        for j in range(nb):
            out[j] = absmax[b0 + j]


@njit(cache=True, fastmath=_FAST)
def _gemv_portable(  # pragma: no cover - compiled
    packed: np.ndarray,
    absmax: np.ndarray,
    nested: bool,
    qabs: np.ndarray,
    absmax2: np.ndarray,
    code2: np.ndarray,
    offset: np.float32,
    dq_bs: int,
    code: np.ndarray,
    blocksize: int,
    out_f: int,
    in_f: int,
    x: np.ndarray,
    y: np.ndarray,
) -> None:
    """Any shape: element (r, i) is flat f = r·in + i; scale from block f // B."""
    sc = np.empty(1, np.float32)
    for r in range(out_f):
        acc = np.float32(0.0)
        f = r * in_f
        end = f + in_f
        while f < end:
            b = f // blocksize
            stop = min((b + 1) * blocksize, end)  # this row's part of block b
            _row_scales(b, 1, absmax, nested, qabs, absmax2, code2, offset, dq_bs, sc)
            c = sc[0]
            s = np.float32(0.0)
            i0 = f - r * in_f
            for g in range(f, stop):
                byte = np.int64(packed[g >> 1])
                q = (byte >> 4) if (g & 1) == 0 else (byte & 15)  # even flat index: high nibble
                s += code[q] * x[i0 + g - f]  # Σ code[q_i]·x_i over the block's items
            acc += s * c  # y_r += c_b · Σ code[q_i]·x_i
            f = stop
        y[r] = acc


_WIDTH = simd_width()
_LANES = _WIDTH if _WIDTH else 8  # lanes of the module's SIMD kernel (compiled only if used)
_group = make_gemv_group(_LANES)
_group4 = make_gemv_group(_LANES, 4)  # four groups per call: more independent work in flight


def _gemv_simd_py(  # pragma: no cover - compiled
    packed: np.ndarray,
    absmax: np.ndarray,
    nested: bool,
    qabs: np.ndarray,
    absmax2: np.ndarray,
    code2: np.ndarray,
    offset: np.float32,
    dq_bs: int,
    code: np.ndarray,
    blocksize: int,
    out_f: int,
    in_f: int,
    x: np.ndarray,
    y: np.ndarray,
) -> None:
    """Rows of whole groups (in % 8·lanes == 0) and whole blocks (in % B == 0)."""
    width = _LANES
    gw = 8 * width  # weights per group (one word of 8 nibbles per lane)
    ng = in_f // gw
    xp = np.empty((8, ng * width), np.float32)  # xp[e, g·w + k] = x[g·gw + 8k + e]
    for g in range(ng):
        for k in range(width):
            for e in range(8):
                xp[e, g * width + k] = x[g * gw + 8 * k + e]
    bpr = in_f // blocksize  # blocks per row
    sc = np.zeros(bpr + width, np.float32)  # this row's c_b (padded for a vector load)
    sidx = np.empty(width, np.int32)  # lane k's block within its group
    for k in range(width):
        sidx[k] = (8 * k) // blocksize
    bshift = 0  # B = 2^bshift
    while (1 << bshift) < blocksize:
        bshift += 1
    acc = np.zeros(4 * width, np.float32)  # four independent accumulators
    half = in_f // 2
    for r in range(out_f):
        _row_scales(r * bpr, bpr, absmax, nested, qabs, absmax2, code2, offset, dq_bs, sc)
        for t in range(4 * width):
            acc[t] = 0.0
        ng4 = ng - ng % 4
        for g in range(0, ng4, 4):
            # acc[h] += c_lane · Σ_e code[q_e]·x_e over group g+h's 8·width weights, h < 4
            _group4(acc, 0, packed, r * half + g * (gw // 2), xp, g * width, code, sc, g,
                    bshift, sidx)  # fmt: skip
        for g in range(ng4, ng):
            _group(acc, (g & 3) * width, packed, r * half + g * (gw // 2), xp, g * width, code,
                   sc, g, bshift, sidx)  # fmt: skip
        y[r] = acc.sum()  # y_r = Σ over the four accumulators' lanes


_gemv_simd = njit(cache=True, fastmath=_FAST)(_gemv_simd_py)


def make_gemv_simd(width: int) -> Any:
    """The same kernel for another lane count (tests run the AVX2 one on AVX-512 CPUs)."""
    glb = {
        **globals(),
        "_LANES": width,
        "_group": make_gemv_group(width),
        "_group4": make_gemv_group(width, 4),
    }
    fn = types_mod.FunctionType(_gemv_simd_py.__code__, glb, "_gemv_simd_" + str(width))
    return njit(cache=False, fastmath=_FAST)(fn)


def _ro(a: np.ndarray, dtype: Any) -> np.ndarray:
    """A read-only contiguous view: one compiled signature whatever the caller's flags."""
    v = np.ascontiguousarray(a, dtype=dtype).view()
    v.flags.writeable = False
    return v


def _dq_parts(state: Any) -> tuple:
    """(absmax, nested, qabs, absmax2, code2, offset, dq_bs) as the kernels take them."""
    dummy_u8, dummy_f = _ro(np.zeros(1), np.uint8), _ro(np.zeros(1), np.float32)
    if state.state2 is None:
        return (
            _ro(state.absmax, np.float32),
            False,
            dummy_u8,
            dummy_f,
            _ro(np.zeros(256), np.float32),
            np.float32(0.0),
            1,
        )
    s2 = state.state2
    return (
        dummy_f,
        True,
        _ro(state.absmax, np.uint8),
        _ro(s2.absmax, np.float32),
        _ro(s2.code, np.float32),
        np.float32(s2.offset),
        int(s2.blocksize),
    )


def gemv_4bit(packed: Any, state: Any, x: Any, *, impl: str = "numba") -> Any:
    """y = Ŵ·x (``x @ Ŵᵀ`` for one row) from 4-bit codes, Ŵ never formed. [qlora.gemv4]

    packed, state: from ``quantize_4bit`` of a 2-D weight W (out, in). x: (in,) or (B, in)
    (B rows one after another: for more than a few rows dequantize once and use a matmul).
    Returns float32 (out,) or (B, out). impl: 'numba' (fused, default), 'reference'
    (dequantize-then-matmul reference), 'cuda' (CuPy arrays in and out).
    """
    from ...quant.blockwise import QuantState

    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a QuantState, got {type(state).__name__}")
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    if len(state.shape) != 2:
        raise ValueError(f"state: expected a 2-D weight (out, in), got shape {state.shape}")
    out_f, in_f = state.shape
    n_bytes = (out_f * in_f + 1) // 2
    if getattr(packed, "dtype", None) != np.uint8 or packed.size != n_bytes:
        raise ValueError(
            f"packed: expected uint8 with {n_bytes} bytes for shape {state.shape}, got "
            f"{getattr(packed, 'dtype', type(packed).__name__)} with "
            f"{getattr(packed, 'size', '?')} items"
        )
    if not hasattr(x, "shape") or x.ndim not in (1, 2) or x.shape[-1] != in_f:
        raise ValueError(
            f"x: expected shape ({in_f},) or (B, {in_f}), got {getattr(x, 'shape', x)}"
        )
    if impl == "cuda":
        from ..cuda import gemv4 as cuda_gemv4

        return cuda_gemv4.gemv_4bit(packed, state, x)
    code = _ro(state.code, np.float32)
    packed_np = _ro(packed, np.uint8).reshape(-1)
    xs = _ro(x, np.float32).reshape(-1, in_f)  # (B, in)
    if impl == "reference":
        y = gemv_4bit_reference(
            packed_np, state.block_scales(), code, state.blocksize, (out_f, in_f), xs.T
        ).T  # (B, out)
        return y.reshape(out_f) if x.ndim == 1 else y
    parts = _dq_parts(state)
    use_simd = _WIDTH > 0 and in_f % state.blocksize == 0 and in_f % (8 * _WIDTH) == 0
    fn = _gemv_simd if use_simd else _gemv_portable
    y = np.empty((xs.shape[0], out_f), dtype=np.float32)
    for row in range(xs.shape[0]):
        fn(
            packed_np,
            *parts,
            code,
            np.int64(state.blocksize),
            np.int64(out_f),
            np.int64(in_f),
            xs[row],
            y[row],
        )
    return y.reshape(out_f) if x.ndim == 1 else y
