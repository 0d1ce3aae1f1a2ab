"""Where the tests run the engine: NumPy, the strict CuPy stand-in, and real CuPy on a GPU.

The stand-in (``tests/standin/cupy``) plays the device on machines without a GPU: its
arrays refuse implicit conversion to NumPy and refuse to mix with host arrays, and it
counts every refusal and every transfer. ``on_backend(name)`` puts it (or the real CuPy) in
place for the duration of a block and selects minipeft's ``"cupy"`` backend.

``BACKENDS`` is the list every backend-parametrized test runs over: ``numpy`` and
``standin`` always, ``cupy`` too where CuPy sees a device (``python -m minipeft gpu-check``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import array_api_compat.common._helpers as _aac
import numpy as np

from minipeft import backend

STANDIN_DIR = Path(__file__).resolve().parent / "standin"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name,
        STANDIN_DIR / name / "__init__.py",
        submodule_search_locations=[str(STANDIN_DIR / name)],
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
    return module


_STANDIN: tuple[ModuleType, ModuleType] | None = None


def standin_modules() -> tuple[ModuleType, ModuleType]:
    """(cupy, cupyx) of the stand-in, loaded once per process."""
    global _STANDIN
    if _STANDIN is None:
        cupy = _load("cupy")
        saved = sys.modules.get("cupy")
        sys.modules["cupy"] = cupy  # cupyx imports from it
        try:
            cupyx = _load("cupyx")
        finally:
            if saved is None:
                sys.modules.pop("cupy")
            else:
                sys.modules["cupy"] = saved
        _STANDIN = (cupy, cupyx)
    return _STANDIN


def real_cupy_device() -> bool:
    """True where the real CuPy imports and sees a CUDA device."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        if getattr(cupy, "STANDIN", False):
            return False
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


BACKENDS = ["numpy", "standin", *(["cupy"] if real_cupy_device() else [])]


@contextlib.contextmanager
def on_backend(name: str) -> Iterator[ModuleType]:
    """Run the block on ``name`` (numpy, standin or cupy); yields the array module."""
    if name == "numpy":
        with backend.using("numpy"):
            yield np
        return
    saved = {k: sys.modules.get(k) for k in ("cupy", "cupyx")}
    if name == "standin":
        cupy, cupyx = standin_modules()
        sys.modules["cupy"], sys.modules["cupyx"] = cupy, cupyx
    _aac._issubclass_fast.cache_clear()
    try:
        backend.set_backend("cupy")
        import cupy as xp

        yield xp
    finally:
        backend.set_backend("numpy")
        if name == "standin":
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
        _aac._issubclass_fast.cache_clear()


def host(a: Any) -> np.ndarray:
    """A NumPy copy of an array wherever it lives (explicit transfer; never a view)."""
    return np.array(backend.to_numpy(a), copy=True)


def on_device(a: Any) -> bool:
    return backend.placement(a) == "cupy"
