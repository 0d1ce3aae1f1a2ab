"""A strict stand-in for CuPy, for machines without a GPU. Test infrastructure only.

minipeft's device path is written against CuPy. The project's machines have no GPU, so the
tests put this package in CuPy's place (``sys.modules["cupy"]``, or ``PYTHONPATH`` for a
notebook kernel) and run the engine on it. It is *stricter* than CuPy where CuPy would hide
a host leak, never more lenient:

* its ``ndarray`` is not a NumPy array: ``np.asarray(x)`` raises, as CuPy's does
  ("Implicit conversion to a NumPy array is not allowed");
* an operation that mixes a device array with a non-scalar host array raises (CuPy raises
  for ufuncs and kernels; for indexing and assignment it would silently copy the host
  array to the device on every call — the stand-in refuses that too);
* every refusal is counted (``stats()["refused"]``), so a refusal that some ``except``
  swallowed still fails the test that checks the count;
* transfers are explicit and counted: host → device through ``asarray``/``array``
  (``h2d``), device → host through ``get``, ``asnumpy``, ``item``, ``float``, ``tolist``,
  printing (``d2h``);
* reductions return 0-d device arrays, as CuPy's do (not NumPy scalars);
* random numbers come from ``cupy.random.default_rng`` with the methods CuPy's Generator
  has (``random``, ``standard_normal``, ``integers``, ``uniform``), and differ from NumPy's
  stream as CuPy's do;
* ``RawModule`` compiles a CUDA source for the CPU under minipeft's emulation of the CUDA
  built-ins (``minipeft.kernels.cuda.emulate``), so the launchers run unchanged.

The arithmetic is NumPy's (float64 results equal the NumPy backend's bit for bit, unless a
code path computes differently on the device). This is not a backend: minipeft never
imports it; only the tests (``tests/device.py``) and ``MINIPEFT_BACKEND=cupy`` notebook runs
under ``PYTHONPATH=tests/standin`` put it in CuPy's place.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as _np

__version__ = "13.0.0+standin"
STANDIN = True  # lets a test tell the stand-in from the real CuPy

_STATS: Counter = Counter()


def stats() -> dict[str, int]:
    """Counts since the last ``reset_stats``: refused, h2d, d2h (transfers of data)."""
    return {k: _STATS[k] for k in ("refused", "h2d", "d2h")}


def reset_stats() -> None:
    _STATS.clear()


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Count refusals and transfers inside the block only (yields the live counter)."""
    saved = Counter(_STATS)
    _STATS.clear()
    try:
        yield _STATS
    finally:
        now = Counter(_STATS)
        _STATS.clear()
        _STATS.update(saved + now)


class _Refused(TypeError):
    pass


def _refuse(message: str) -> None:
    _STATS["refused"] += 1
    raise _Refused(f"strict CuPy stand-in: {message}")


def _is_host_array(x: Any) -> bool:
    return isinstance(x, _np.ndarray) and x.ndim > 0


def _unwrap(x: Any, where: str) -> Any:
    """NumPy view of device arrays (recursively in lists/tuples); host arrays are refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        if x.ndim > 0:
            _refuse(
                f"{where}: a host (NumPy) array of shape {x.shape} mixed with device arrays; "
                "move it explicitly with cupy.asarray"
            )
        return x
    if isinstance(x, list | tuple):
        return type(x)(_unwrap(i, where) for i in x)
    return x


def _wrap(r: Any) -> Any:
    if isinstance(r, _np.ndarray):
        return ndarray(r)
    if isinstance(r, _np.generic) and not isinstance(r, _np.dtype):
        return ndarray(_np.asarray(r))  # CuPy reductions give 0-d arrays, not scalars
    if isinstance(r, tuple):
        return tuple(_wrap(i) for i in r)
    if isinstance(r, list):
        return [_wrap(i) for i in r]
    return r


def _host_copy(x: ndarray) -> _np.ndarray:
    _STATS["d2h"] += 1
    return x._a.copy()


class _Pointer:
    """``x.data``: only ``ptr`` (launchers check alignment with it)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class ndarray:
    """A device array: a NumPy array that cannot leave the device implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0

    def __init__(self, a: Any) -> None:
        if not isinstance(a, _np.ndarray):
            raise TypeError(f"stand-in ndarray wraps a NumPy array, got {type(a).__name__}")
        self._a = a

    # ------------------------------------------------------------ leaving the device
    def __array__(self, dtype: Any = None, copy: Any = None) -> _np.ndarray:
        _refuse(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly."
        )
        raise AssertionError  # unreachable

    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> _np.ndarray:
        return _host_copy(self)

    def item(self) -> Any:
        _STATS["d2h"] += 1
        return self._a.item()

    def tolist(self) -> Any:
        _STATS["d2h"] += 1
        return self._a.tolist()

    def __float__(self) -> float:
        _STATS["d2h"] += 1
        return float(self._a)

    def __int__(self) -> int:
        _STATS["d2h"] += 1
        return int(self._a)

    def __bool__(self) -> bool:
        _STATS["d2h"] += 1
        return bool(self._a)

    def __complex__(self) -> complex:
        _STATS["d2h"] += 1
        return complex(self._a)

    def __repr__(self) -> str:
        _STATS["d2h"] += 1
        return repr(self._a).replace("array(", "array(", 1)

    def __str__(self) -> str:
        _STATS["d2h"] += 1
        return str(self._a)

    def __format__(self, spec: str) -> str:
        _STATS["d2h"] += 1
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def set(self, arr: Any) -> None:
        """Copy a host array into this device array (explicit, counted)."""
        _STATS["h2d"] += 1
        self._a[...] = _np.asarray(arr)

    # ------------------------------------------------------------ NumPy protocols
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        # CuPy routes np.<ufunc>(device arrays) to its own ufunc; a host operand raises
        ins = _unwrap(inputs, f"numpy.{ufunc.__name__}")
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], f"numpy.{ufunc.__name__}(out=)")
        return _wrap(getattr(ufunc, method)(*ins, **kwargs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        # CuPy routes np.<function>(device arrays) to cupy.<function>
        name = func.__name__
        return _function(name, func)(*args, **kwargs)

    # ------------------------------------------------------------ attributes
    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    @shape.setter
    def shape(self, value: Any) -> None:
        self._a.shape = value

    @property
    def dtype(self) -> _np.dtype:
        return self._a.dtype

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def itemsize(self) -> int:
        return self._a.itemsize

    @property
    def nbytes(self) -> int:
        return self._a.nbytes

    @property
    def strides(self) -> tuple[int, ...]:
        return self._a.strides

    @property
    def flags(self) -> Any:
        return self._a.flags

    @property
    def data(self) -> _Pointer:
        return _Pointer(self._a.ctypes.data)

    @property
    def device(self) -> Any:
        return cuda.Device(0)

    @property
    def T(self) -> ndarray:
        return ndarray(self._a.T)

    @property
    def real(self) -> ndarray:
        return ndarray(self._a.real)

    @property
    def base(self) -> Any:
        return None if self._a.base is None else self

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[ndarray]:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        for i in range(len(self._a)):
            yield ndarray(self._a[i : i + 1].reshape(self._a.shape[1:]))

    # ------------------------------------------------------------ indexing
    def __getitem__(self, key: Any) -> ndarray:
        return ndarray(_np.asarray(self._a[_key(key)]))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_key(key)] = _unwrap(value, "__setitem__ value")

    # ------------------------------------------------------------ methods
    def astype(self, dtype: Any, order: str = "K", casting: Any = None, copy: bool = True) -> Any:
        return ndarray(self._a.astype(dtype, order=order, copy=copy))

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        return ndarray(self._a.reshape(*shape, order=order))

    def transpose(self, *axes: Any) -> ndarray:
        return ndarray(self._a.transpose(*axes))

    def view(self, dtype: Any = None) -> ndarray:
        return ndarray(self._a.view() if dtype is None else self._a.view(dtype))

    def copy(self, order: str = "C") -> ndarray:
        return ndarray(self._a.copy(order=order))

    def fill(self, value: Any) -> None:
        self._a.fill(_unwrap(value, "fill"))

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo: Any) -> ndarray:
        return self.copy()

    def __getattr__(self, name: str) -> Any:
        # the remaining ndarray methods (sum, max, argmax, ravel, clip, ...): same as
        # NumPy's, on device data, strict about host arguments, 0-d device results
        if name.startswith("__"):
            raise AttributeError(name)
        meth = getattr(self._a, name)
        if not callable(meth):
            raise AttributeError(f"stand-in ndarray has no attribute {name!r}")

        def call(*args: Any, **kwargs: Any) -> Any:
            a = _unwrap(args, f"ndarray.{name}")
            k = {key: _unwrap(v, f"ndarray.{name}") for key, v in kwargs.items()}
            return _wrap(meth(*a, **k))

        return call


def _key(key: Any) -> Any:
    """An index on device data: device arrays and Python ints/slices; no host arrays."""
    if isinstance(key, tuple):
        return tuple(_key(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, _np.ndarray) and key.ndim > 0:
        _refuse(
            f"index: a host (NumPy) array of shape {key.shape} indexes a device array "
            "(CuPy would copy it to the device on every call); move it once"
        )
    if isinstance(key, list):
        _STATS["h2d"] += 1
        return _np.asarray(_unwrap(key, "index"))
    return key


def _binary(name: str, reflected: bool = False) -> Any:
    op = getattr(_np.ndarray, f"__{name}__")
    check = f"operator {name}"

    def method(self: ndarray, other: Any) -> Any:
        if not isinstance(other, ndarray | _np.ndarray | _np.generic | int | float | bool):
            return NotImplemented
        o = _unwrap(other, check)
        r = op(self._a, o) if not reflected else getattr(_np.ndarray, f"__r{name}__")(self._a, o)
        return _wrap(r) if r is not NotImplemented else NotImplemented

    return method


def _inplace(name: str) -> Any:
    op = getattr(_np.ndarray, f"__i{name}__")

    def method(self: ndarray, other: Any) -> ndarray:
        op(self._a, _unwrap(other, f"operator i{name}"))
        return self

    return method


for _name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
    "and", "or", "xor", "lshift", "rshift",
):  # fmt: skip
    setattr(ndarray, f"__{_name}__", _binary(_name))
    setattr(ndarray, f"__r{_name}__", _binary(_name, reflected=True))
    setattr(ndarray, f"__i{_name}__", _inplace(_name))
for _name in ("lt", "le", "gt", "ge"):
    setattr(ndarray, f"__{_name}__", _binary(_name))


def _eq(self: ndarray, other: Any) -> Any:
    return _binary("eq")(self, other)


def _ne(self: ndarray, other: Any) -> Any:
    return _binary("ne")(self, other)


ndarray.__eq__ = _eq  # type: ignore[method-assign,assignment]
ndarray.__ne__ = _ne  # type: ignore[method-assign,assignment]
ndarray.__hash__ = None  # type: ignore[assignment]
for _name in ("neg", "pos", "abs", "invert"):
    setattr(
        ndarray,
        f"__{_name}__",
        (lambda op: lambda self: ndarray(op(self._a)))(getattr(_np.ndarray, f"__{_name}__")),
    )


# ---------------------------------------------------------------- the namespace
def _to_device(obj: Any, dtype: Any = None, copy: bool | None = None) -> ndarray:
    """cupy.asarray / cupy.array: the one host → device door (counted)."""
    if isinstance(obj, ndarray):
        a = obj._a
        if dtype is not None and _np.dtype(dtype) != a.dtype:
            return ndarray(a.astype(dtype))
        return ndarray(a.copy()) if copy else obj
    if isinstance(obj, _np.ndarray | list | tuple):
        if not isinstance(obj, _np.ndarray) or obj.ndim > 0:
            _STATS["h2d"] += 1
        obj = _unwrap(obj, "asarray") if isinstance(obj, list | tuple) else obj
    return ndarray(_np.array(obj, dtype=dtype, copy=True))


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    return _to_device(a, dtype)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: Any = None, **_: Any) -> ndarray:
    return _to_device(obj, dtype, copy=copy)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    d = _to_device(a, dtype)
    return d if d._a.flags.c_contiguous else ndarray(_np.ascontiguousarray(d._a))


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> _np.ndarray:
    if isinstance(a, ndarray):
        return _host_copy(a)
    return _np.asarray(a)


def get_array_module(*args: Any) -> Any:
    import sys

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


class _Ufunc:
    """A NumPy ufunc on device arrays, with the methods minipeft uses (``at``, ``reduce``)."""

    def __init__(self, uf: _np.ufunc) -> None:
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        a = _unwrap(args, f"cupy.{self.__name__}")
        k = {key: _unwrap(v, f"cupy.{self.__name__}") for key, v in kwargs.items()}
        return _wrap(self._uf(*a, **k))

    def at(self, a: ndarray, indices: Any, b: Any = None) -> None:
        args = (_unwrap(a, "ufunc.at"), _key(indices))
        self._uf.at(*args, *(() if b is None else (_unwrap(b, "ufunc.at"),)))

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return _wrap(self._uf.reduce(*_unwrap(args, "ufunc.reduce"), **kwargs))

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        return _wrap(self._uf.outer(*_unwrap(args, "ufunc.outer"), **kwargs))


#: creation functions whose first argument is a shape, not data
_CREATION = {"zeros", "ones", "empty", "full", "eye", "identity", "arange", "linspace", "tri"}


@functools.cache
def _function(name: str, fn: Any) -> Any:
    if isinstance(fn, _np.ufunc):
        return _Ufunc(fn)
    where = f"cupy.{name}"

    def call(*args: Any, **kwargs: Any) -> Any:
        a = _unwrap(args, where)
        k = {key: _unwrap(v, where) for key, v in kwargs.items()}
        return _wrap(fn(*a, **k))

    call.__name__ = name
    call.__qualname__ = name
    return call


_PASS_THROUGH = {
    # dtypes, constants and pure functions of shapes/dtypes: the same objects as NumPy's,
    # as CuPy re-exports them
    "dtype", "finfo", "iinfo", "result_type", "promote_types", "can_cast", "isscalar",
    "broadcast_shapes", "newaxis", "pi", "e", "inf", "nan", "euler_gamma", "ndim", "shape",
    "issubdtype", "bool_", "number", "floating", "integer", "signedinteger",
    "unsignedinteger", "generic", "inexact", "complexfloating",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        obj = getattr(_np, name)
    except AttributeError:
        raise AttributeError(f"module 'cupy' (stand-in) has no attribute {name!r}") from None
    if name in _PASS_THROUGH or isinstance(obj, type) or not callable(obj):
        return obj
    return _function(name, obj)


# ---------------------------------------------------------------- submodules
class _Namespace:
    """A submodule (linalg, fft) whose functions are NumPy's on device arrays."""

    def __init__(self, name: str, module: Any) -> None:
        self._name, self._module = name, module

    def __getattr__(self, name: str) -> Any:
        return _function(f"{self._name}.{name}", getattr(self._module, name))


linalg = _Namespace("linalg", _np.linalg)
fft = _Namespace("fft", _np.fft)


class _Generator:
    """cupy.random.Generator: the methods CuPy's has; draws happen on the device."""

    def __init__(self, seed: Any = None) -> None:
        self._g = _np.random.default_rng(seed)

    def random(self, size: Any = None, dtype: Any = _np.float64, out: Any = None) -> ndarray:
        return ndarray(_np.asarray(self._g.random(size, dtype=dtype)))

    def standard_normal(self, size: Any = None, dtype: Any = _np.float64) -> ndarray:
        return ndarray(_np.asarray(self._g.standard_normal(size, dtype=dtype)))

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None) -> ndarray:
        return ndarray(_np.asarray(self._g.uniform(low, high, size)))

    def integers(
        self, low: int, high: int | None = None, size: Any = None, dtype: Any = _np.int64
    ) -> ndarray:
        return ndarray(_np.asarray(self._g.integers(low, high, size, dtype=dtype)))


class _Random:
    Generator = _Generator

    @staticmethod
    def default_rng(seed: Any = None) -> _Generator:
        return _Generator(seed)


random = _Random()


class _Runtime:
    @staticmethod
    def getDeviceCount() -> int:
        return 1

    @staticmethod
    def getDeviceProperties(device: int) -> dict[str, Any]:
        return {"name": b"strict CuPy stand-in (CPU)", "totalGlobalMem": 0}


class _Stream:
    def synchronize(self) -> None:
        pass


class _Device:
    def __init__(self, device: int = 0) -> None:
        self.id = device
        self.compute_capability = "90"

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (stand-in)>"


class _Event:
    """cupy.cuda.Event: host clock readings (the stand-in's timings mean nothing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass


class _Cuda:
    runtime = _Runtime()
    Device = _Device
    Event = _Event

    @staticmethod
    def get_elapsed_time(start: _Event, end: _Event) -> float:
        return 1e3 * (end.t - start.t)  # milliseconds, as CuPy's

    class Stream:
        null = _Stream()

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_current_stream() -> _Stream:
        return _Stream()


cuda = _Cuda()


class RawModule:
    """``cupy.RawModule(code=...)``: the source compiled for the CPU under the emulation of
    the CUDA built-ins; kernels take stand-in arrays as CuPy's take device pointers."""

    def __init__(self, code: str | None = None, options: tuple[str, ...] = (), **_: Any) -> None:
        from minipeft.kernels.cuda.emulate import EmulatedModule

        if code is None:
            raise TypeError("stand-in RawModule: code= is required")
        self._module = EmulatedModule(code, options=tuple(options))

    def get_function(self, name: str) -> Any:
        fn = self._module.get_function(name)

        def launch(grid: Any, block: Any, args: Any, shared_mem: int = 0, **_: Any) -> None:
            host_args = tuple(_kernel_arg(a, name) for a in args)
            fn(tuple(grid), tuple(block), host_args, shared_mem=shared_mem)

        return launch


def _kernel_arg(a: Any, kernel: str) -> Any:
    if isinstance(a, ndarray):
        return a._a
    if _is_host_array(a):
        _refuse(f"kernel {kernel}: a host array of shape {a.shape} passed as a device pointer")
    return a
