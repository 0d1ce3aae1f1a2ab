"""cupyx for the strict CuPy stand-in (tests only): ``scatter_add``."""

from __future__ import annotations

from typing import Any

import numpy as np
from cupy import _key, _unwrap, ndarray


def scatter_add(a: ndarray, slices: Any, value: Any) -> None:
    """``a[slices] += value`` with repeated indices accumulated (np.add.at on device data)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"scatter_add: expected a device array, got {type(a).__name__}")
    np.add.at(a._a, _key(slices), _unwrap(value, "scatter_add"))
