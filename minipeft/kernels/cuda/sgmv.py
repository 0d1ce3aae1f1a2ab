"""Launcher for ``sgmv.cu``: the mixed-adapter LoRA branch on a CUDA device via CuPy.

Two kernels, as in Punica (derivations/lora_serving.md, ``lora.serving_mixed_batch``):

    shrink   v_i  = s_{a(i)} · A_{a(i)} x_i          one block per row, a warp per rank
    expand   y_i += B_{a(i)} v_i                     one thread per (row, output)

The NumPy reference the kernels must equal is
``minipeft.peft.serving.lora_mixed_delta_reference``; the comparison test runs wherever CuPy
sees a device. The source is compiled by NVRTC through ``cupy.RawModule`` on first use.
"""

from __future__ import annotations

from ...backend import Array
from . import load_module, source_path

__all__ = ["SOURCE", "sgmv_lora_delta_cuda"]

#: the CUDA source file next to this module
SOURCE = source_path("sgmv")

_THREADS_SHRINK = 128  # four warps per row: ranks k, k+4, … per warp
_THREADS_EXPAND = 256


def sgmv_lora_delta_cuda(
    x: Array,
    A: Array,
    B: Array,
    scaling: Array,
    ranks: Array,
    adapter_ids: Array,
    out: Array | None = None,
) -> Array:
    """Δy_i = s_{a(i)}·(x_i A_{a(i)}ᵀ) B_{a(i)}ᵀ added into ``out`` (N, out) on the device.

    Shapes as ``minipeft.kernels.cpu.sgmv.sgmv_lora_delta``: x (N, in), A (n, r_max, in),
    B (n, out, r_max), scaling (n,), ranks (n,) int64, adapter_ids (N,) int64 (−1: none);
    all CuPy arrays of one floating dtype (float32 or float64).
    """
    import cupy

    dtype = x.dtype
    if dtype not in (cupy.float32, cupy.float64):
        raise TypeError(f"x: expected float32 or float64, got {dtype}")
    suffix = "f32" if dtype == cupy.float32 else "f64"
    x = cupy.ascontiguousarray(x)
    A = cupy.ascontiguousarray(A, dtype=dtype)
    B = cupy.ascontiguousarray(B, dtype=dtype)
    scaling = cupy.ascontiguousarray(scaling, dtype=dtype)
    ranks = cupy.ascontiguousarray(ranks, dtype=cupy.int64)
    ids = cupy.ascontiguousarray(adapter_ids, dtype=cupy.int64)
    n_rows, d_in = x.shape
    r_max, d_out = A.shape[1], B.shape[1]
    if out is None:
        out = cupy.zeros((n_rows, d_out), dtype=dtype)
    if n_rows == 0 or r_max == 0:
        return out
    v = cupy.zeros((n_rows, r_max), dtype=dtype)  # (N, r_max)
    mod = load_module("sgmv")  # cupy.RawModule, compiled once by NVRTC
    shrink = mod.get_function(f"sgmv_shrink_{suffix}")
    expand = mod.get_function(f"sgmv_expand_{suffix}")
    i32 = cupy.int32
    shrink(
        (n_rows,),
        (_THREADS_SHRINK,),
        (x, A, scaling, ranks, ids, v, i32(n_rows), i32(d_in), i32(r_max)),
    )
    grid = (n_rows, (d_out + _THREADS_EXPAND - 1) // _THREADS_EXPAND)
    expand(
        grid,
        (_THREADS_EXPAND,),
        (v, B, ranks, ids, out, i32(n_rows), i32(d_out), i32(r_max)),
        shared_mem=r_max * dtype.itemsize,
    )
    return out
