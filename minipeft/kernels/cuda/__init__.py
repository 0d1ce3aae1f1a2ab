"""minipeft.kernels.cuda: CUDA C sources (``*.cu``) and their CuPy launchers.

Each kernel lives in ``<name>.cu`` next to a launcher ``<name>.py``. Sources are compiled
at run time by NVRTC through ``cupy.RawModule`` (:func:`load_module`), so they must not
include host headers; ``tests/test_cuda_sources.py`` compiles every ``*.cu`` here with
``nvcc`` for sm_80 and sm_90 and fails on any error or warning, and the comparison tests
against the NumPy references run wherever CuPy sees a device.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

__all__ = ["CUDA_DIR", "device_available", "load_module", "source_path", "sources"]

#: the folder holding the ``.cu`` sources
CUDA_DIR = Path(__file__).resolve().parent


def sources() -> list[Path]:
    """Every ``.cu`` source in this package, sorted by name."""
    return sorted(CUDA_DIR.glob("*.cu"))


def source_path(name: str) -> Path:
    """Path of ``<name>.cu`` (``name`` with or without the suffix); ValueError if absent."""
    stem = name.removesuffix(".cu")
    path = CUDA_DIR / f"{stem}.cu"
    if not path.is_file():
        known = [p.stem for p in sources()]
        raise ValueError(f"name: expected one of {known}, got {name!r}")
    return path


def device_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def load_module(name: str, options: tuple[str, ...] = ("--std=c++17",)) -> Any:
    """``cupy.RawModule`` compiled from ``<name>.cu`` (cached per CuPy module, name and
    options: the tests put a CPU stand-in in CuPy's place, and one process may see both)."""
    import cupy

    return _load_module(cupy, name, options)


@functools.cache
def _load_module(cupy: Any, name: str, options: tuple[str, ...]) -> Any:
    return cupy.RawModule(code=source_path(name).read_text(), options=options)
