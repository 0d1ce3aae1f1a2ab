"""Launcher for ``gemv4.cu``: fused 4-bit GEMV y = Ŵ·x on a CUDA device (CuPy).

Called by ``minipeft.kernels.cpu.gemv4.gemv_4bit(..., impl="cuda")``; compared with a
float64 reference in ``tests/test_gemv4.py`` wherever CuPy sees a device.

    gemv4_rows     rows of whole blocks, 16-byte aligned codes: one warp per row, a uint4 of
                   codes (32 weights) and eight float4 of x per lane and step
    gemv4_generic  any shape: one warp per row, one element per lane and step
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import load_module

__all__ = ["gemv_4bit"]

_WARPS = 4  # must equal GEMV4_WARPS in gemv4.cu (rows per thread block)


def gemv_4bit(packed: Any, state: Any, x: Any) -> Any:
    """y (float32 CuPy, (out,) or (B, out)) for packed codes + QuantState of W (out, in)."""
    import cupy

    out_f, in_f = state.shape
    packed_d = cupy.ascontiguousarray(cupy.asarray(packed), dtype=cupy.uint8).reshape(-1)
    xs = cupy.ascontiguousarray(cupy.asarray(x), dtype=cupy.float32).reshape(-1, in_f)  # (B, in)
    n_rows = int(xs.shape[0])
    if n_rows == 0:  # an empty batch: CUDA rejects a grid with a zero dimension
        y = cupy.empty((0, out_f), dtype=cupy.float32)
        return y.reshape(out_f) if x.ndim == 1 else y
    dummy_u8, dummy_f = cupy.zeros(1, cupy.uint8), cupy.zeros(1, cupy.float32)
    if state.state2 is None:
        absmax, qabs, absmax2 = cupy.asarray(state.absmax, dtype=cupy.float32), dummy_u8, dummy_f
        code2, offset, dq_bs, nested = cupy.zeros(256, cupy.float32), 0.0, 1, 0
    else:
        s2 = state.state2
        absmax, qabs = dummy_f, cupy.asarray(state.absmax, dtype=cupy.uint8)
        absmax2, code2 = cupy.asarray(s2.absmax, cupy.float32), cupy.asarray(s2.code, cupy.float32)
        offset, dq_bs, nested = float(s2.offset), int(s2.blocksize), 1
    code = cupy.ascontiguousarray(cupy.asarray(state.code), dtype=cupy.float32)  # host or device
    y = cupy.empty((n_rows, out_f), dtype=cupy.float32)
    aligned = in_f % state.blocksize == 0 and packed_d.data.ptr % 16 == 0 and xs.data.ptr % 16 == 0
    name = "gemv4_rows" if aligned else "gemv4_generic"
    load_module("gemv4").get_function(name)(
        ((out_f + _WARPS - 1) // _WARPS, n_rows),
        (32 * _WARPS,),
        (
            packed_d, absmax, qabs, absmax2, code2, np.float32(offset), np.int32(dq_bs),
            np.int32(nested), code, np.int32(state.blocksize), np.int64(out_f), np.int64(in_f),
            xs, y,
        ),
    )  # fmt: skip
    return y.reshape(out_f) if x.ndim == 1 else y
