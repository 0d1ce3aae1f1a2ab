"""Mixed batches: one forward in which every row uses its own LoRA adapter (or none).

A server that hosts many fine-tunes of one base model (multi-tenant serving: Punica,
S-LoRA, vLLM; HF PEFT's ``adapter_names=[...]`` argument) receives a batch whose rows
belong to different adapters. The base product x·W₀ᵀ is shared; only the low-rank branch
differs per row (derivations/lora_serving.md, ``lora.serving_mixed_batch``):

    y_i = x_i·W₀ᵀ + b + s_{a(i)} · (x_i·A_{a(i)}ᵀ)·B_{a(i)}ᵀ          a(i) ∈ {−1, 0, …, n−1}

where a(i) = −1 means "no adapter" (PEFT's ``"__base__"``). The adapters are stacked and
zero-padded to a common rank r_max (``AdapterStack``): zero rows of A and zero columns of
B add nothing, so padding is exact.

Three implementations must agree:

- ``lora_mixed_delta_reference`` — NumPy, grouped by adapter: for each adapter a, gather
  its rows, two matrix products, scatter back. The reference.
- ``minipeft.kernels.cpu.sgmv`` — Numba, SGMV-style (shrink then expand over segments of
  rows that share an adapter, tiles of 4 rows sharing every load of A and B).
- ``minipeft.kernels.cuda.sgmv`` — the same two passes as CUDA kernels for cupy.RawModule.

``lora_mixed_forward`` adds the base product and dispatches to one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Array, xp_of

__all__ = [
    "AdapterStack",
    "lora_layer_mixed_forward",
    "lora_mixed_delta",
    "lora_mixed_delta_reference",
    "lora_mixed_forward",
    "stack_adapters",
]

#: the adapter name that means "no adapter" in a mixed batch (as in HF PEFT)
BASE_NAME = "__base__"

_IMPLS = ("numpy", "numba", "cuda", "auto")


@dataclass(frozen=True)
class AdapterStack:
    """n adapters of one layer, stacked and zero-padded to a common rank r_max.

    A (n, r_max, in), B (n, out, r_max), scaling (n,), ranks (n,) int64; ``Bt`` is B
    transposed to (n, r_max, out), contiguous (the layout the Numba expand pass reads).
    """

    A: Array
    B: Array
    scaling: Array
    ranks: Array
    Bt: Array

    @property
    def n_adapters(self) -> int:
        return int(self.A.shape[0])

    @property
    def r_max(self) -> int:
        return int(self.A.shape[1])


def stack_adapters(
    adapters: Sequence[tuple[Array, Array, float]], *, r_max: int | None = None, dtype: Any = None
) -> AdapterStack:
    """Stack ``[(A_a, B_a, s_a), …]`` (A_a (r_a, in), B_a (out, r_a)) into an AdapterStack.

    Ranks may differ; each adapter is zero-padded to ``r_max`` (default: the largest rank).
    ``dtype`` defaults to the dtype of the first A.
    """
    if len(adapters) == 0:
        raise ValueError("adapters: expected at least one (A, B, scaling), got none")
    shapes = []
    for idx, item in enumerate(adapters):
        if len(item) != 3:
            raise ValueError(f"adapters[{idx}]: expected (A, B, scaling), got {len(item)} items")
        A, B, _ = item
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(
                f"adapters[{idx}]: expected A (r, in) and B (out, r), got shapes "
                f"{tuple(A.shape)} and {tuple(B.shape)}"
            )
        if A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapters[{idx}]: rank of A ({A.shape[0]}) and of B ({B.shape[1]}) differ"
            )
        shapes.append((A.shape[0], A.shape[1], B.shape[0]))
    d_in, d_out = shapes[0][1], shapes[0][2]
    for idx, (_, i, o) in enumerate(shapes):
        if (i, o) != (d_in, d_out):
            raise ValueError(
                f"adapters[{idx}]: expected (in, out) = {(d_in, d_out)} as adapter 0, got {(i, o)}"
            )
    ranks = [r for r, _, _ in shapes]
    r_max = max(ranks) if r_max is None else int(r_max)
    if r_max < max(ranks):
        raise ValueError(f"r_max: expected at least the largest rank {max(ranks)}, got {r_max}")
    xp = xp_of(adapters[0][0])
    dtype = adapters[0][0].dtype if dtype is None else np.dtype(dtype)
    n = len(adapters)
    A_s = xp.zeros((n, r_max, d_in), dtype=dtype)  # (n, r_max, in)
    B_s = xp.zeros((n, d_out, r_max), dtype=dtype)  # (n, out, r_max)
    for a, (A, B, _) in enumerate(adapters):
        A_s[a, : A.shape[0]] = A
        B_s[a, :, : B.shape[1]] = B
    scaling = xp.asarray([float(s) for _, _, s in adapters], dtype=dtype)
    Bt = xp.ascontiguousarray(B_s.transpose(0, 2, 1))  # (n, r_max, out)
    return AdapterStack(A_s, B_s, scaling, xp.asarray(ranks, dtype=np.int64), Bt)


# ---------------------------------------------------------------------------- validation
def _validate(
    x: Array, stack: AdapterStack, adapter_ids: Any
) -> tuple[Array, Array, tuple[int, ...]]:
    """x (..., in) → (N, in) rows; adapter_ids → (N,) int64. Raises naming the argument."""
    if not isinstance(stack, AdapterStack):
        raise TypeError(f"stack: expected an AdapterStack, got {type(stack).__name__}")
    if getattr(x, "ndim", 0) < 1:
        raise ValueError("x: expected an array (..., in), got a scalar")
    if x.dtype.kind != "f":
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    if x.dtype != stack.A.dtype:
        raise TypeError(f"x: dtype {x.dtype} differs from the adapters' dtype {stack.A.dtype}")
    d_in = stack.A.shape[2]
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dimension in={d_in}, got shape {tuple(x.shape)}")
    xp = xp_of(x)
    ids = xp.asarray(adapter_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"adapter_ids: expected integers, got dtype {ids.dtype}")
    lead = tuple(x.shape[:-1])
    if tuple(ids.shape) != lead:
        if x.ndim >= 2 and ids.ndim == 1 and ids.shape[0] == x.shape[0]:
            # one id per sequence (PEFT's adapter_names): broadcast over the other axes
            ids = xp.broadcast_to(ids.reshape((-1,) + (1,) * (x.ndim - 2)), lead)
        else:
            raise ValueError(
                f"adapter_ids: expected shape {lead} (one id per row) or ({lead[:1]}) "
                f"(one per sequence), got {tuple(ids.shape)}"
            )
    ids = ids.reshape(-1).astype(np.int64)  # (N,)
    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= stack.n_adapters):
        raise ValueError(
            f"adapter_ids: expected values in [-1, {stack.n_adapters - 1}], got "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    x2 = xp.ascontiguousarray(x.reshape(-1, d_in))  # (N, in)
    return x2, ids, lead


# ---------------------------------------------------------------------------- reference
def lora_mixed_delta_reference(
    x: Array, stack: AdapterStack, adapter_ids: Any, *, out: Array | None = None
) -> Array:
    """LoRA branch of a mixed batch, grouped by adapter — [lora.serving_mixed_batch].

    Δy_i = s_{a(i)} · (x_i·A_{a(i)}ᵀ)·B_{a(i)}ᵀ, and Δy_i = 0 where a(i) = −1.
    x (..., in); adapter_ids of shape x.shape[:-1] (or one per sequence); returns (..., out).
    When ``out`` (..., out) is given, Δy is added into it and it is returned.
    """
    x2, ids, lead = _validate(x, stack, adapter_ids)
    xp = xp_of(x2)
    dy = _out_rows(out, x2, stack, lead)  # (N, out)
    for a in range(stack.n_adapters):
        rows = xp.nonzero(ids == a)[0]
        if rows.size == 0:
            continue
        r = int(stack.ranks[a])
        A_a, B_a = stack.A[a, :r], stack.B[a, :, :r]  # (r, in), (out, r)
        # Δy_rows = s_a · (x_rows A_aᵀ) B_aᵀ        (gather, two products, scatter)
        dy[rows] += stack.scaling[a] * ((x2[rows] @ A_a.T) @ B_a.T)
    return dy.reshape((*lead, dy.shape[1]))


def _out_rows(out: Array | None, x2: Array, stack: AdapterStack, lead: tuple[int, ...]) -> Array:
    """The (N, out) accumulator: a view of ``out`` when given (checked), else zeros."""
    xp = xp_of(x2)
    d_out = stack.B.shape[1]
    if out is None:
        return xp.zeros((x2.shape[0], d_out), dtype=x2.dtype)
    if tuple(out.shape) != (*lead, d_out) or out.dtype != x2.dtype:
        raise ValueError(
            f"out: expected shape {(*lead, d_out)} and dtype {x2.dtype}, "
            f"got {tuple(out.shape)} and {out.dtype}"
        )
    if not out.flags.c_contiguous:
        raise ValueError("out: expected a C-contiguous array (it is updated in place)")
    return out.reshape(-1, d_out)  # a view: updates land in `out`


def lora_mixed_delta(
    x: Array,
    stack: AdapterStack,
    adapter_ids: Any,
    *,
    impl: str = "auto",
    out: Array | None = None,
) -> Array:
    """LoRA branch of a mixed batch by ``impl``: "numpy" (the reference), "numba" (SGMV on
    the CPU), "cuda" (SGMV kernels on a CuPy device) or "auto" (cuda for CuPy arrays,
    numba for NumPy arrays). With ``out`` (..., out), Δy is added into it in place."""
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    is_cupy = xp_of(x) is not np
    if impl == "auto":
        impl = "cuda" if is_cupy else "numba"
    if impl == "numpy":
        return lora_mixed_delta_reference(x, stack, adapter_ids, out=out)
    x2, ids, lead = _validate(x, stack, adapter_ids)
    dy = _out_rows(out, x2, stack, lead)  # (N, out)
    if impl == "numba":
        if is_cupy:
            raise TypeError("impl: 'numba' runs on NumPy arrays, got CuPy arrays")
        from ..kernels.cpu.sgmv import sgmv_lora_delta

        sgmv_lora_delta(x2, stack.A, None, stack.scaling, stack.ranks, ids, out=dy, Bt=stack.Bt)
    else:
        if not is_cupy:
            raise TypeError("impl: 'cuda' runs on CuPy arrays, got NumPy arrays")
        from ..kernels.cuda.sgmv import sgmv_lora_delta_cuda

        sgmv_lora_delta_cuda(x2, stack.A, stack.B, stack.scaling, stack.ranks, ids, out=dy)
    return dy.reshape((*lead, dy.shape[1]))


def lora_mixed_forward(
    x: Array,
    weight: Array,
    stack: AdapterStack,
    adapter_ids: Any,
    bias: Array | None = None,
    *,
    impl: str = "auto",
) -> Array:
    """y = x·W₀ᵀ + b + Δy: the whole layer over a mixed batch (weight (out, in)).

    The base product is computed once for all rows; the LoRA branch is added into it in
    place by ``impl`` (see ``lora_mixed_delta``)."""
    if weight.ndim != 2 or tuple(weight.shape) != (stack.B.shape[1], stack.A.shape[2]):
        raise ValueError(
            f"weight: expected shape (out, in) = {(stack.B.shape[1], stack.A.shape[2])}, "
            f"got {tuple(weight.shape)}"
        )
    y = x @ weight.T  # (..., out)   the shared base product
    if bias is not None:
        y += bias
    return lora_mixed_delta(x, stack, adapter_ids, impl=impl, out=y)


def lora_layer_mixed_forward(layer: Any, x: Array, adapter_names: Sequence[str]) -> Array:
    """A ``LoraLayer``'s forward over a mixed batch, HF PEFT's ``adapter_names`` semantics.

    ``adapter_names`` gives one name per sequence (x (B, …, in)) or per row; ``"__base__"``
    means no adapter. Inference only: no gradient, no dropout; the layer must not be merged
    and the named adapters must be plain LoRA (DoRA's per-row norm does not split this way).
    Returns an array (…, out).
    """
    from ..autograd.tensor import Tensor, no_grad

    names = list(adapter_names)
    if getattr(layer, "merged_adapters", None):
        raise ValueError(
            f"layer: adapters {layer.merged_adapters} are merged; unmerge before a mixed batch"
        )
    known = getattr(layer, "r", None)
    if not isinstance(known, dict):
        raise TypeError(f"layer: expected a LoraLayer, got {type(layer).__name__}")
    used = sorted({n for n in names if n != BASE_NAME})
    for n in used:
        if n not in known:
            raise ValueError(f"adapter_names: unknown adapter {n!r}; have {sorted(known)}")
        if layer.use_dora.get(n, False):
            raise ValueError(f"adapter_names: {n!r} is a DoRA adapter; mixed batches need LoRA")
    x_arr = x.data if isinstance(x, Tensor) else x
    with no_grad():
        y = layer.base_layer(Tensor(x_arr)).data  # x·W₀ᵀ + b, in the base layer's own layout
    if not used:
        return y
    index = {n: i for i, n in enumerate(used)}
    ids = np.asarray([index.get(n, -1) for n in names], dtype=np.int64)
    stack = stack_adapters(
        [
            (layer.lora_A[n].weight.data, layer.lora_B[n].weight.data, layer.scaling[n])
            for n in used
        ],
        dtype=x_arr.dtype,
    )
    y = xp_of(y).ascontiguousarray(y)
    return lora_mixed_delta(x_arr, stack, xp_of(x_arr).asarray(ids), out=y)
