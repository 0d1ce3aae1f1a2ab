"""SGMV on the CPU: one LoRA forward over a batch whose rows use different adapters.

Multi-tenant serving (Punica's "segmented gather matrix-vector", vLLM's LoRA kernels,
HF PEFT's ``adapter_names``) keeps the base weight W₀ shared and applies, to row i, the
adapter a(i) of that row (derivations/lora_serving.md, ``lora.serving_mixed_batch``):

    y_i = x_i·W₀ᵀ + s_{a(i)} · (x_i·A_{a(i)}ᵀ)·B_{a(i)}ᵀ        (a(i) = −1: no adapter)

with the adapters stacked and zero-padded to a common rank r_max:
A (n_adapters, r_max, in), B (n_adapters, out, r_max). The kernel does the LoRA branch in
two passes, as Punica does:

    shrink   v_i = s_{a(i)} · A_{a(i)}[:r_a] x_i          v (N, r_max)
    expand   y_i += B_{a(i)}[:, :r_a] v_i                 y (N, out), accumulated in place

Rows are first grouped by adapter (a counting sort — the "segments"), and each segment is
cut into tiles of ``TILE`` rows that share every load of A and B: a tile is a tiny GEMM
(TILE × in times in × r), so the adapter's factors are read once per tile instead of once
per row. Tiles are independent, so they run in parallel (``prange``) when Numba has more
than one thread; with ``NUMBA_DISABLE_JIT=1`` the same code runs as plain Python.

Only the first ``ranks[a]`` rows of A_a (columns of B_a) are touched: padding costs no
arithmetic. The NumPy reference that this kernel must equal is
``minipeft.peft.serving.lora_mixed_delta_reference``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...backend import Array

__all__ = ["TILE", "segment_rows", "sgmv_expand", "sgmv_lora_delta", "sgmv_shrink"]

#: rows per tile; 4 rows share each load of A and B (see the module docstring)
TILE = 4


@njit(cache=True)
def segment_rows(adapter_ids: Array, n_adapters: int) -> tuple[Array, Array, Array]:
    """Group rows by adapter: ``order`` lists row indices adapter by adapter, ``starts[a]``
    is where adapter a's rows begin in ``order`` (rows with id −1 are left out), and
    ``tiles`` (n_tiles, 3) holds (adapter, begin, end) ranges of at most TILE rows."""
    n = adapter_ids.shape[0]
    counts = np.zeros(n_adapters + 1, dtype=np.int64)
    for i in range(n):
        a = adapter_ids[i]
        if a >= 0:
            counts[a + 1] += 1
    starts = np.cumsum(counts)  # starts[a] … starts[a+1] are adapter a's rows in `order`
    fill = starts[:-1].copy()
    order = np.empty(starts[-1], dtype=np.int64)
    for i in range(n):  # stable counting sort: rows keep their order inside a segment
        a = adapter_ids[i]
        if a >= 0:
            order[fill[a]] = i
            fill[a] += 1
    n_tiles = 0
    for a in range(n_adapters):
        n_tiles += (starts[a + 1] - starts[a] + TILE - 1) // TILE
    tiles = np.empty((n_tiles, 3), dtype=np.int64)
    t = 0
    for a in range(n_adapters):
        for b in range(starts[a], starts[a + 1], TILE):
            tiles[t, 0] = a
            tiles[t, 1] = b
            tiles[t, 2] = min(b + TILE, starts[a + 1])
            t += 1
    return order, starts, tiles


@njit(cache=True, fastmath=True, parallel=True)
def sgmv_shrink(
    x: Array, A: Array, scaling: Array, ranks: Array, order: Array, tiles: Array, v: Array
) -> None:
    """v[i, k] = s_a · Σ_j x[i, j]·A[a, k, j] for every row i of adapter a (k < ranks[a]).

    A full tile computes a 4 × 4 block of v at a time (4 rows × 4 ranks): per step j, four
    loads of A and four of x feed sixteen multiply-adds (sixteen vector accumulators once
    vectorized over j; AVX-512 has the 32 registers this needs)."""
    n_in = x.shape[1]
    zero = x.dtype.type(0)
    for t in prange(tiles.shape[0]):
        a, b, e = tiles[t, 0], tiles[t, 1], tiles[t, 2]
        s = scaling[a]
        r = ranks[a]
        r4 = r - r % 4
        if e - b == 4:
            i0, i1, i2, i3 = order[b], order[b + 1], order[b + 2], order[b + 3]
            for k in range(0, r4, 4):
                p00, p10, p20, p30 = zero, zero, zero, zero  # rank k, rows 0..3
                p01, p11, p21, p31 = zero, zero, zero, zero  # rank k + 1
                p02, p12, p22, p32 = zero, zero, zero, zero  # rank k + 2
                p03, p13, p23, p33 = zero, zero, zero, zero  # rank k + 3
                for j in range(n_in):
                    w0, w1, w2, w3 = A[a, k, j], A[a, k + 1, j], A[a, k + 2, j], A[a, k + 3, j]
                    x0, x1, x2, x3 = x[i0, j], x[i1, j], x[i2, j], x[i3, j]
                    p00 += x0 * w0
                    p10 += x1 * w0
                    p20 += x2 * w0
                    p30 += x3 * w0
                    p01 += x0 * w1
                    p11 += x1 * w1
                    p21 += x2 * w1
                    p31 += x3 * w1
                    p02 += x0 * w2
                    p12 += x1 * w2
                    p22 += x2 * w2
                    p32 += x3 * w2
                    p03 += x0 * w3
                    p13 += x1 * w3
                    p23 += x2 * w3
                    p33 += x3 * w3
                # v = s · A x   (the scaling is folded into the shrink output)
                v[i0, k], v[i1, k], v[i2, k], v[i3, k] = s * p00, s * p10, s * p20, s * p30
                v[i0, k + 1], v[i1, k + 1] = s * p01, s * p11
                v[i2, k + 1], v[i3, k + 1] = s * p21, s * p31
                v[i0, k + 2], v[i1, k + 2] = s * p02, s * p12
                v[i2, k + 2], v[i3, k + 2] = s * p22, s * p32
                v[i0, k + 3], v[i1, k + 3] = s * p03, s * p13
                v[i2, k + 3], v[i3, k + 3] = s * p23, s * p33
            for k in range(r4, r):  # ranks not a multiple of four: the rest one by one
                p00, p10, p20, p30 = zero, zero, zero, zero
                for j in range(n_in):
                    w0 = A[a, k, j]
                    p00 += x[i0, j] * w0
                    p10 += x[i1, j] * w0
                    p20 += x[i2, j] * w0
                    p30 += x[i3, j] * w0
                v[i0, k], v[i1, k], v[i2, k], v[i3, k] = s * p00, s * p10, s * p20, s * p30
        else:  # the ragged end of a segment, row by row
            for p in range(b, e):
                i = order[p]
                for k in range(r):
                    acc = zero
                    for j in range(n_in):
                        acc += x[i, j] * A[a, k, j]
                    v[i, k] = s * acc


@njit(cache=True, fastmath=True, parallel=True)
def sgmv_expand(v: Array, Bt: Array, ranks: Array, order: Array, tiles: Array, y: Array) -> None:
    """y[i, o] += Σ_k Bt[a, k, o]·v[i, k] for every row i of adapter a (k < ranks[a]).

    B is taken transposed, Bt (n_adapters, r_max, out), so that the update of a row is a
    contiguous sum of scaled rows of Bt (vectorized over o). A full tile updates four rows
    with four ranks at a time: four loads of Bt and four of y feed sixteen multiply-adds,
    and each element of y is stored r/4 times instead of r times."""
    n_out = y.shape[1]
    for t in prange(tiles.shape[0]):
        a, b, e = tiles[t, 0], tiles[t, 1], tiles[t, 2]
        r = ranks[a]
        r4 = r - r % 4
        if e - b == 4:
            i0, i1, i2, i3 = order[b], order[b + 1], order[b + 2], order[b + 3]
            for k in range(0, r4, 4):
                c00, c01, c02, c03 = v[i0, k], v[i0, k + 1], v[i0, k + 2], v[i0, k + 3]
                c10, c11, c12, c13 = v[i1, k], v[i1, k + 1], v[i1, k + 2], v[i1, k + 3]
                c20, c21, c22, c23 = v[i2, k], v[i2, k + 1], v[i2, k + 2], v[i2, k + 3]
                c30, c31, c32, c33 = v[i3, k], v[i3, k + 1], v[i3, k + 2], v[i3, k + 3]
                for o in range(n_out):
                    w0, w1, w2, w3 = Bt[a, k, o], Bt[a, k + 1, o], Bt[a, k + 2, o], Bt[a, k + 3, o]
                    # y_i += Σ_k v_ik · B[:, k]   (four ranks at once)
                    y[i0, o] += c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3
                    y[i1, o] += c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3
                    y[i2, o] += c20 * w0 + c21 * w1 + c22 * w2 + c23 * w3
                    y[i3, o] += c30 * w0 + c31 * w1 + c32 * w2 + c33 * w3
            for k in range(r4, r):  # ranks not a multiple of four: the rest one by one
                c0, c1, c2, c3 = v[i0, k], v[i1, k], v[i2, k], v[i3, k]
                for o in range(n_out):
                    w = Bt[a, k, o]
                    y[i0, o] += c0 * w
                    y[i1, o] += c1 * w
                    y[i2, o] += c2 * w
                    y[i3, o] += c3 * w
        else:
            for p in range(b, e):
                i = order[p]
                for k in range(r):
                    c = v[i, k]
                    for o in range(n_out):
                        y[i, o] += c * Bt[a, k, o]


def sgmv_lora_delta(
    x: np.ndarray,
    A: np.ndarray,
    B: np.ndarray | None,
    scaling: np.ndarray,
    ranks: np.ndarray,
    adapter_ids: np.ndarray,
    out: np.ndarray | None = None,
    Bt: np.ndarray | None = None,
) -> np.ndarray:
    """The LoRA branch Δy_i = s_{a(i)}·(x_i A_{a(i)}ᵀ) B_{a(i)}ᵀ, added into ``out``.

    x (N, in) C-contiguous; A (n, r_max, in); B (n, out, r_max); scaling (n,); ranks (n,)
    int64; adapter_ids (N,) int64 with −1 for "no adapter". ``out`` (N, out) is accumulated
    into (pass the base output x·W₀ᵀ to get the whole layer); a zero array is made when it
    is None. ``Bt`` = B transposed to (n, r_max, out), C-contiguous, may be given instead
    of B (a serving engine keeps it with the stacked adapters; otherwise it is made here).
    Arguments are assumed validated by ``minipeft.peft.serving``.
    """
    if Bt is None:
        if B is None:
            raise ValueError("B: expected B (n, out, r_max) or Bt (n, r_max, out), got neither")
        Bt = np.ascontiguousarray(B.transpose(0, 2, 1))  # (n, r_max, out)
    n_adapters = A.shape[0]
    order, _starts, tiles = segment_rows(adapter_ids, n_adapters)
    v = np.empty((x.shape[0], A.shape[1]), dtype=x.dtype)  # (N, r_max), rows of −1 unused
    if out is None:
        out = np.zeros((x.shape[0], Bt.shape[2]), dtype=x.dtype)
    sgmv_shrink(x, A, scaling, ranks, order, tiles, v)
    sgmv_expand(v, Bt, ranks, order, tiles, out)
    return out
