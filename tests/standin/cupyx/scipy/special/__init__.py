"""cupyx.scipy.special for the strict CuPy stand-in (tests only): SciPy's special functions
on device arrays, strict about host arrays as the rest of the stand-in."""

from __future__ import annotations

from typing import Any

import scipy.special as _sps
from cupy import _function


def __getattr__(name: str) -> Any:
    return _function(f"scipy.special.{name}", getattr(_sps, name))
