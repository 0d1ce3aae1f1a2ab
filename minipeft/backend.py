"""The one place that chooses the array namespace and the dtype policy.

minipeft computes with NumPy by default and with CuPy when asked:

    >>> import minipeft
    >>> minipeft.set_backend("numpy")      # the default
    >>> minipeft.set_backend("cupy")       # raises BackendError without CuPy or a device

Arrays carry their namespace with them, so an operation on existing arrays asks
``xp_of(*arrays)`` (dispatch through ``array_api_compat``), while code that creates new
arrays asks ``xp()`` for the current backend.

Where arrays live (design: "Where arrays live"): a tensor lives where its array lives —
NumPy on the host, CuPy on the device. ``set_backend`` chooses where *new* arrays go
(parameters, buffers, ``minipeft.tensor``); existing arrays move only through an explicit
call (``Module.to``, ``to_device``, ``to_numpy``). ``placement(a)`` names where ``a`` lives,
and an operation whose inputs live in two places raises ``PlacementError`` naming both.

Randomness: parameter initialisation is drawn from one NumPy generator (``rng()``) and moved
once, so a model built under either backend has the same weights; dropout masks are drawn
where the data lives (``rng_like(x)``: a CuPy generator on the device), reproducibly from
``seed``.

Dtype policy: float32 is the training default; every gradient check runs in float64
(``with dtype_policy("float64"): ...``).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from typing import Any, TypeAlias

import array_api_compat
import numpy as np

#: A NumPy or CuPy ndarray (whichever backend produced it). Function.forward/backward
#: take and return these; the alias documents intent where a static type cannot.
Array: TypeAlias = Any

__all__ = [
    "Array",
    "BackendError",
    "PlacementError",
    "default_dtype",
    "dtype_policy",
    "get_backend",
    "like",
    "placement",
    "rng",
    "rng_like",
    "scatter_add",
    "seed",
    "set_backend",
    "set_default_dtype",
    "to_device",
    "to_numpy",
    "using",
    "xp",
    "xp_of",
]


class BackendError(RuntimeError):
    """The requested array backend cannot be used here (missing package or device)."""


class PlacementError(ValueError):
    """Arrays that live in different places (host and device) met in one operation."""


_BACKEND: str = "numpy"
_XP: types.ModuleType = np
_DEFAULT_DTYPE: np.dtype = np.dtype(np.float32)
_FLOAT_DTYPES = ("float32", "float64")
_SEED: int = 0
_RNG: np.random.Generator = np.random.default_rng(_SEED)
_DEVICE_RNG: tuple[Any, Any] | None = None  # (cupy module, its generator)
_BACKENDS = ("numpy", "cupy")


def set_backend(name: str) -> None:
    """Select ``"numpy"`` (default) or ``"cupy"`` for newly created arrays.

    Raises BackendError naming what is missing when CuPy is not installed or sees no
    CUDA device, and ValueError for any other name.
    """
    global _BACKEND, _XP
    if name == "numpy":
        _BACKEND, _XP = "numpy", np
        return
    if name != "cupy":
        raise ValueError(f"backend: expected 'numpy' or 'cupy', got {name!r}")
    _BACKEND, _XP = "cupy", _cupy()


def _cupy() -> types.ModuleType:
    """The CuPy module, or BackendError naming what is missing."""
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendError(
            "backend 'cupy' requested but CuPy is not installed; "
            "install the extra: pip install 'minipeft[gpu]'"
        ) from exc
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise BackendError(f"backend 'cupy' requested but CUDA is unusable: {exc}") from exc
    if n_devices < 1:  # pragma: no cover - depends on the machine
        raise BackendError("backend 'cupy' requested but no CUDA device is visible")
    return cupy


def _backend_from_environment() -> None:
    """``MINIPEFT_BACKEND=cupy`` (or ``numpy``) selects the backend when minipeft is
    imported, so a notebook or script runs on the GPU by setting one variable."""
    name = os.environ.get("MINIPEFT_BACKEND", "").strip()
    if not name:
        return
    try:
        set_backend(name)
    except ValueError as exc:
        raise ValueError(f"MINIPEFT_BACKEND: {exc}") from None
    except BackendError as exc:
        raise BackendError(f"MINIPEFT_BACKEND={name}: {exc}") from None


def get_backend() -> str:
    """Name of the current backend: ``"numpy"`` or ``"cupy"``."""
    return _BACKEND


def xp() -> types.ModuleType:
    """The current backend's module (``numpy`` or ``cupy``), for creating arrays."""
    return _XP


def xp_of(*arrays: Any) -> types.ModuleType:
    """The array module that owns ``arrays`` (NumPy for scalars and NumPy arrays).

    Dispatch is done by ``array_api_compat``; we return the library's own module rather
    than the strict array-API wrapper because minipeft also uses functions outside the
    standard (``add.at``/``scatter_add``, ``einsum``).
    """
    for a in arrays:
        if array_api_compat.is_cupy_array(a):
            import cupy

            return cupy
    return np


def placement(a: Any) -> str:
    """Where ``a`` lives: ``"cupy"`` for a CuPy array, ``"numpy"`` for anything else."""
    return "cupy" if array_api_compat.is_cupy_array(a) else "numpy"


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy (or view) of ``a`` wherever it lives."""
    if array_api_compat.is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a: Any, name: str | None = None) -> Any:
    """``a`` moved to backend ``name`` (default: the current one); unchanged if already there.

    The one explicit door between host and device: ``"numpy"`` copies a CuPy array to the
    host, ``"cupy"`` copies a NumPy array (or Python data) to the device.
    """
    name = _BACKEND if name is None else name
    if name not in _BACKENDS:
        raise ValueError(f"device: expected one of {_BACKENDS}, got {name!r}")
    if name == "numpy":
        return to_numpy(a) if array_api_compat.is_cupy_array(a) else a
    if array_api_compat.is_cupy_array(a):
        return a
    return (_XP if _BACKEND == "cupy" else _cupy()).asarray(a)


def like(a: Any, ref: Any) -> Any:
    """``a`` as an array in ``ref``'s namespace (Python data and host arrays beside a device
    ``ref`` are copied there once; use it at a model's entry, never on the hot path)."""
    if array_api_compat.is_cupy_array(ref):
        return to_device(a, "cupy")
    return to_device(a, "numpy") if array_api_compat.is_cupy_array(a) else np.asarray(a)


def scatter_add(target: Any, index: Any, values: Any) -> None:
    """``target[index] += values`` with repeated indices accumulated (unbuffered)."""
    if array_api_compat.is_cupy_array(target):
        import cupyx

        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


def default_dtype() -> np.dtype:
    """The floating dtype for new tensors and parameters (float32 unless changed)."""
    return _DEFAULT_DTYPE


def set_default_dtype(dtype: Any) -> None:
    """Set the default floating dtype; only float32 and float64 are supported."""
    global _DEFAULT_DTYPE
    d = np.dtype(dtype)
    if d.name not in _FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {_FLOAT_DTYPES}, got {d.name}")
    _DEFAULT_DTYPE = d


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Temporarily create new arrays on backend ``name`` ("numpy" or "cupy")."""
    old = _BACKEND
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


@contextlib.contextmanager
def dtype_policy(dtype: Any) -> Iterator[None]:
    """Temporarily use ``dtype`` as the default (gradient checks use float64)."""
    old = _DEFAULT_DTYPE
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(old)


def seed(value: int) -> None:
    """Reseed minipeft's global generator (parameter init, dropout masks)."""
    global _RNG, _SEED, _DEVICE_RNG
    if not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {value!r}")
    _SEED = int(value)
    _RNG = np.random.default_rng(_SEED)
    _DEVICE_RNG = None  # recreated from the new seed on first use


def rng() -> np.random.Generator:
    """minipeft's global NumPy generator (results are reproducible from ``seed``)."""
    return _RNG


def rng_like(a: Any) -> Any:
    """The generator for random draws beside ``a``: ``rng()`` on the host, a CuPy generator
    (seeded from the same ``seed``) on the device, so masks are drawn where they are used."""
    global _DEVICE_RNG
    if not array_api_compat.is_cupy_array(a):
        return _RNG
    import cupy

    if _DEVICE_RNG is None or _DEVICE_RNG[0] is not cupy:
        _DEVICE_RNG = (cupy, cupy.random.default_rng(_SEED))
    return _DEVICE_RNG[1]


_backend_from_environment()
