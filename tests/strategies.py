"""Hypothesis strategies shared by minipeft's tests (import them: ``from strategies import ...``).

Shapes are small on purpose (every float64 gradient check is a few hundred forward passes).
Floats are bounded and never NaN/inf; helpers keep inputs away from kinks (ReLU at 0, ties
of a max) because a central difference across a kink measures neither one-sided slope.

    shapes(...)                 a shape tuple
    float_arrays(shape, ...)    bounded float64 arrays (no NaN, no subnormals)
    broadcastable_shapes(n)     n shapes that broadcast together
    layouts() / with_layout     the same values stored C-contiguous, Fortran-ordered,
                                strided (every other element of a bigger buffer) or reversed
    noncontiguous_arrays(...)   float arrays in a drawn layout
    off_kinks(x, kinks)         move entries within ``margin`` of a kink away from it
    distinct(x, gap)            break ties: entries keep their order and differ by >= gap
    ranks(d, k)                 a rank r with 1 <= r <= min(d, k)
"""

from __future__ import annotations

from collections.abc import Sequence

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import strategies as st

__all__ = [
    "LAYOUTS",
    "broadcastable_shapes",
    "distinct",
    "float_arrays",
    "layouts",
    "noncontiguous_arrays",
    "off_kinks",
    "ranks",
    "shapes",
    "with_layout",
]

LAYOUTS = ("C", "F", "strided", "reversed")


def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    """Array shapes with ``min_dims..max_dims`` axes of ``min_side..max_side`` each."""
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def broadcastable_shapes(
    num_shapes: int = 2, min_dims: int = 0, max_dims: int = 3, max_side: int = 4
):
    """``num_shapes`` shapes that broadcast together (NumPy rules), as a tuple."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims, max_side=max_side
    ).map(lambda bs: bs.input_shapes)


def float_arrays(shape: Sequence[int], lo: float = -3.0, hi: float = 3.0, dtype=np.float64):
    """Arrays of ``shape`` with finite entries in [lo, hi] (no NaN, inf or subnormal)."""
    elements = st.floats(
        min_value=lo,
        max_value=hi,
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
        width=64 if np.dtype(dtype) == np.float64 else 32,
    )
    return hnp.arrays(dtype, tuple(shape), elements=elements)


def layouts():
    """A memory layout name from ``LAYOUTS``."""
    return st.sampled_from(LAYOUTS)


def with_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The values of ``x`` stored in ``layout`` (a view that is not C-contiguous when it can)."""
    x = np.asarray(x)
    if layout == "C" or x.ndim == 0:
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "strided":
        buf = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        buf[..., ::2] = x
        return buf[..., ::2]  # (..., n) view with stride 2 on the last axis
    if layout == "reversed":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]  # negative last stride
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


@st.composite
def noncontiguous_arrays(draw, shape: Sequence[int], lo: float = -3.0, hi: float = 3.0):
    """Bounded float64 arrays of ``shape`` in a drawn layout (often not C-contiguous)."""
    x = draw(float_arrays(shape, lo, hi))
    return with_layout(x, draw(layouts()))


def off_kinks(x: np.ndarray, kinks: Sequence[float] = (0.0,), margin: float = 1e-2) -> np.ndarray:
    """A copy of ``x`` with entries closer than ``margin`` to a kink moved to kink ± margin."""
    y = np.array(x, dtype=np.float64, copy=True)
    for k in kinks:
        near = np.abs(y - k) < margin
        y[near] = k + np.where(y[near] >= k, margin, -margin)
    return y.astype(np.asarray(x).dtype)


def distinct(x: np.ndarray, gap: float = 1e-2) -> np.ndarray:
    """``x`` with ties broken: order kept (stable) and neighbours at least ``gap`` apart.

    Adding rank·gap to each entry keeps every strict inequality and turns each tie into a
    gap of at least ``gap``: for a < b, (b + r_b·gap) − (a + r_a·gap) ≥ gap.
    """
    x = np.asarray(x)
    flat = x.reshape(-1).astype(np.float64)
    rank = np.empty(flat.size)
    rank[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (flat + rank * gap).reshape(x.shape).astype(x.dtype)


@st.composite
def ranks(draw, d: int, k: int):
    """A rank r with 1 <= r <= min(d, k)."""
    return draw(st.integers(min_value=1, max_value=max(1, min(d, k))))
