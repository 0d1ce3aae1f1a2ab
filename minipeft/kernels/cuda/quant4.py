"""Launcher for ``quant4.cu``: blockwise 4-bit quantize / dequantize on a CUDA device (CuPy).

Called by ``minipeft.quant.quantize_4bit(..., impl="cuda")`` and
``dequantize_4bit(..., impl="cuda")``; the bytes equal the NumPy reference
(``tests/test_blockwise.py`` compares them wherever CuPy sees a device).

    quant4_absmax      one thread block per quantization block: c_b = max |x_i|
    quant4_quantize    one thread per output byte: two codes, high nibble first, each by the
                       branchless telescoping sum over the 15 midpoints (as the Numba kernel)
    quant4_dequantize  one thread per byte: x̂ = code[q]·c_b for both nibbles, one float2 store
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import load_module

__all__ = ["dequantize_4bit", "quantize_4bit"]

_THREADS = 256  # must equal QUANT4_THREADS in quant4.cu (shared-memory reduction size)


def quantize_4bit(x: Any, blocksize: int, mids: np.ndarray, order: np.ndarray) -> tuple[Any, Any]:
    """(packed uint8 ((n+1)//2,), absmax float32 (n_blocks,)), both CuPy arrays."""
    import cupy

    flat = cupy.ascontiguousarray(cupy.asarray(x), dtype=cupy.float32).reshape(-1)  # (n,)
    n = int(flat.size)
    if not bool(cupy.isfinite(flat).all()):
        bad = int((~cupy.isfinite(flat)).sum())
        raise ValueError(f"x: expected finite values, got {bad} non-finite")
    if blocksize % 2:
        raise ValueError(f"blocksize: expected an even size, got {blocksize}")
    if np.size(mids) != 15 or np.size(order) != 16:
        raise ValueError(
            f"mids, order: expected 15 and 16 items, got {np.size(mids)}, {np.size(order)}"
        )
    mids_np = np.ascontiguousarray(mids, dtype=np.float32)
    order_np = np.ascontiguousarray(order, dtype=np.uint8)
    pad_code = order_np[int(np.searchsorted(mids_np, np.float32(0.0), side="left"))]
    n_blocks = -(-n // blocksize)
    n_bytes = (n + 1) // 2
    absmax = cupy.empty(n_blocks, dtype=cupy.float32)
    packed = cupy.empty(n_bytes, dtype=cupy.uint8)
    mod = load_module("quant4")
    i64, i32 = np.int64, np.int32
    mod.get_function("quant4_absmax")(
        (n_blocks,), (_THREADS,), (flat, i64(n), i32(blocksize), absmax)
    )
    mod.get_function("quant4_quantize")(
        ((n_bytes + _THREADS - 1) // _THREADS,),
        (_THREADS,),
        (
            flat,
            i64(n),
            i32(blocksize),
            absmax,
            cupy.asarray(mids_np),
            cupy.asarray(order_np),
            np.uint8(pad_code),
            packed,
        ),
    )
    return packed, absmax


def dequantize_4bit(packed: Any, absmax: Any, code: np.ndarray, blocksize: int, n: int) -> Any:
    """x̂ = code[q]·c_b as a float32 CuPy array (n,)."""
    import cupy

    packed_d = cupy.ascontiguousarray(cupy.asarray(packed), dtype=cupy.uint8).reshape(-1)
    absmax_d = cupy.ascontiguousarray(cupy.asarray(absmax), dtype=cupy.float32)
    code_d = cupy.ascontiguousarray(cupy.asarray(code), dtype=cupy.float32)  # host or device
    out = cupy.empty(n, dtype=cupy.float32)
    n_bytes = (n + 1) // 2
    load_module("quant4").get_function("quant4_dequantize")(
        ((n_bytes + _THREADS - 1) // _THREADS,),
        (_THREADS,),
        (packed_d, absmax_d, code_d, np.int32(blocksize), np.int64(n), out),
    )
    return out
