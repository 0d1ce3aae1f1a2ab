"""Execute the CUDA kernels of this package on the CPU, under a faithful emulation.

:class:`EmulatedModule` takes a ``.cu`` source as ``cupy.RawModule`` does (code text and
options) and returns kernels with CuPy's ``RawKernel`` call convention,
``fn(grid, block, args, shared_mem=0)``, where the "device" arrays are NumPy arrays (their
data pointer is passed) and the value parameters NumPy scalars of the kernel's parameter
type (checked: a mismatch is a ``TypeError``, where CuPy would pass the wrong bytes).

How it works
    The source is compiled by g++ together with ``emulate.h``, a header of the CUDA
    built-ins the kernels use: ``threadIdx``/``blockIdx``/``blockDim``/``gridDim``,
    ``__syncthreads``, ``__shfl_{,up_,down_,xor_}sync``, vector types (``float2``,
    ``float4``, ``uint4``, …, ``make_*``), ``__fmul_rn``/``__fadd_rn``/``__fdiv_rn``/
    ``__frcp_rn`` (one IEEE operation each: no ``-ffast-math``, ``-ffp-contract=off``), and
    no-op qualifiers (``__global__``, ``__device__``, ``__forceinline__``; ``__restrict__``
    is a g++ keyword, ``#pragma unroll`` is ignored). Two mechanical rewrites, which keep
    every line number: ``__shared__ T a[N];`` becomes a reference to per-block storage
    (``cuemu::shared_static``) and ``extern __shared__ T a[];`` a pointer to the launch's
    dynamic shared memory; a declaration of another form fails to compile. An extern "C"
    table of the ``extern "C" __global__`` kernels found in the source unpacks a
    ``void** args`` array by each kernel's parameter types, as ``cuLaunchKernel`` does.

    Each CUDA thread of a block is an OS thread (a reusable pool); blocks run one after
    another. Shared memory is allocated per block at its exact size and filled with 0xFF
    bytes (NaN as a float). The emulator reports, as :class:`EmulationError` naming the
    kernel, block and thread: a thread that exits while others wait at ``__syncthreads``
    (or that others reach after it exited), threads of one block at different barriers,
    a shuffle whose mask omits the caller or names a lane that exited or does not exist,
    lanes of one warp at different shuffles, a lane reading a lane outside the mask, and
    any state in which every live thread waits (deadlock) — never a hang.

    ``sanitize="thread"`` or ``"address"`` builds an executable under ThreadSanitizer or
    AddressSanitizer + UndefinedBehaviorSanitizer and runs each launch in a subprocess
    (the arrays are copied to exact-size heap blocks there and copied back): a missing
    ``__syncthreads`` is a data race on shared memory, an out-of-bounds index an ASan
    report, a misaligned ``float4``/``uint4`` load a UBSan report — each raised as
    :class:`SanitizerError` with the report.

    Builds are cached under ``$MINIPEFT_CUEMU_CACHE`` (default ``~/.cache/minipeft/cuemu``,
    else the temp directory), keyed by a hash of the translated source, the header, the
    flags and the compiler version; a build is written to a temporary name and renamed, so
    concurrent processes may race safely.

What it cannot show
    Timing, coalescing, bank conflicts, occupancy; the scheduling order of warps and blocks
    (blocks never overlap here, so a race *between* blocks goes unseen); warp lockstep
    outside shuffles (independent thread scheduling is what is emulated); FMA contraction,
    which nvcc applies to ``a*b + c`` by default (the host never contracts, so plain float
    expressions may differ from the GPU in the last bits — compare those with a tolerance);
    device code guarded by ``__CUDA_ARCH__`` (not defined), inline PTX, atomics, textures.
    Out-of-bounds accesses are found only under ``sanitize="address"``; in-process they are
    as undefined as in C++.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "HEADER",
    "EmulatedKernel",
    "EmulatedModule",
    "EmulationError",
    "Launch",
    "SanitizerError",
    "compiler",
    "translate",
]

#: the header of emulated CUDA built-ins
HEADER = Path(__file__).resolve().with_name("emulate.h")

_SANITIZERS = ("thread", "address")
_COMMON = [
    "-std=c++17",
    "-pthread",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-strict-aliasing",
    "-Wno-unknown-pragmas",
]
_FLAGS = {
    None: ["-O2", "-fPIC", "-shared"],
    "thread": ["-O1", "-g", "-fsanitize=thread", "-DCUEMU_MAIN"],
    "address": [  # -O0: half the compile time of -O1, and nothing optimized away
        "-O0",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-DCUEMU_MAIN",
    ],
}
_SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0:atexit_sleep_ms=0",
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:exitcode=67",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=68",
}
_SANITIZER_MARKS = ("ThreadSanitizer", "AddressSanitizer", "runtime error:", "LeakSanitizer")
_MAX_BLOCK_THREADS, _MAX_DYNAMIC_SHARED = 1024, 48 * 1024  # CUDA's limits (no opt-in)


class EmulationError(RuntimeError):
    """An error the emulator detected at a launch (barrier, shuffle, deadlock, bad launch)."""


class SanitizerError(EmulationError):
    """A sanitizer reported an error while a kernel ran (the report is the message)."""


class Launch(NamedTuple):
    """One kernel launch, as recorded by :attr:`EmulatedModule.launches`."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int


# ---------------------------------------------------------------------- translation
_COMMENT = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.DOTALL)
_ALIGN = r"(?:__align__\s*\(\s*\d+\s*\)\s+)?"
_TYPE = r"(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;{}]*?>)?(?:\s+[A-Za-z_]\w*)*?)"
_EXTERN = re.compile(
    rf"extern\s+__shared__\s+{_ALIGN}{_TYPE}\s+{_ALIGN}(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;"
)
_STATIC = re.compile(
    rf"__shared__\s+{_ALIGN}{_TYPE}\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);"
)
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+([A-Za-z_]\w*)\s*\(')


def _strip_comments(code: str) -> str:
    """Comments replaced by as many newlines (line numbers kept); string literals kept."""

    def repl(m: re.Match[str]) -> str:
        text = m.group(0)
        return text if text.startswith('"') else "\n" * text.count("\n")

    return _COMMENT.sub(repl, code)


def translate(code: str) -> tuple[str, list[str]]:
    """(host C++ translation unit, kernel names) for a CUDA source, line numbers kept.

    ``extern __shared__ T a[];`` → ``T* const a = (T*)cuemu::dynamic_shared();`` and
    ``__shared__ T a[N]…;`` → ``T (&a)[N]… = cuemu::shared_static<T[N]…, k>();``; then a
    table of the ``extern "C" __global__`` kernels. ValueError when no kernel is found.
    """
    src = _strip_comments(code)
    keep = lambda m: "\n" * m.group(0).count("\n")  # noqa: E731 - newlines inside a match

    def dynamic(m: re.Match[str]) -> str:
        t, name = m.group("type"), m.group("name")
        return f"{t}* const {name} = reinterpret_cast<{t}*>(::cuemu::dynamic_shared());{keep(m)}"

    counter = iter(range(1 << 30))

    def static(m: re.Match[str]) -> str:
        t, name, dims = m.group("type"), m.group("name"), re.sub(r"\s+", "", m.group("dims"))
        k = next(counter)
        return f"{t} (&{name}){dims} = ::cuemu::shared_static<{t}{dims}, {k}>();{keep(m)}"

    src = _STATIC.sub(static, _EXTERN.sub(dynamic, src))
    names = _KERNEL.findall(src)
    if not names:
        raise ValueError('code: expected at least one extern "C" __global__ kernel, found none')
    entries = ",\n".join(f'    ::cuemu::entry("{n}", &{n})' for n in names)
    tail = f"""
static const ::cuemu::Entry cuemu_entries[] = {{
{entries}
}};
extern "C" int cuemu_count() {{ return {len(names)}; }}
extern "C" const char* cuemu_name(int i) {{ return cuemu_entries[i].name; }}
extern "C" const char* cuemu_signature(int i) {{ return cuemu_entries[i].signature.c_str(); }}
extern "C" int cuemu_launch(int i, const unsigned* grid, const unsigned* block,
                            unsigned long long shmem, void* const* args, char* err,
                            unsigned long long errlen) {{
    return ::cuemu::launch(cuemu_entries[i], grid, block, shmem, args, err, errlen);
}}
#ifdef CUEMU_MAIN
int main(int argc, char** argv) {{
    if (argc == 2 && std::string(argv[1]) == "--signatures") {{
        for (const auto& e : cuemu_entries) std::printf("%s %s\\n", e.name, e.signature.c_str());
        return 0;
    }}
    return argc == 3 ? ::cuemu::run_request(argv[1], argv[2]) : 2;
}}
#endif
"""
    unit = f'#include "{HEADER}"\n#line 1 "kernel.cu"\n{src}\n{tail}'
    return unit, names


# ---------------------------------------------------------------------- building
@functools.cache
def compiler() -> str | None:
    """Path of g++, or None when it is not installed (the emulation then cannot run)."""
    return shutil.which("g++")


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _cache_dir() -> Path:
    env = os.environ.get("MINIPEFT_CUEMU_CACHE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")))
    candidates[-1] = candidates[-1] / "minipeft" / "cuemu"
    candidates.append(Path(tempfile.gettempdir()) / f"minipeft-cuemu-{os.getuid()}")
    for cand in candidates:
        try:
            cand.mkdir(parents=True, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            continue
    raise EmulationError(f"no writable cache directory among {candidates}")


def _options(options: Sequence[str]) -> list[str]:
    """CuPy/NVRTC options that mean the same to g++ (--std, -D); any other is refused."""
    out = []
    for opt in options:
        if re.fullmatch(r"--?std=c\+\+\d\d", opt):
            out.append("-std=" + opt.split("=", 1)[1])
        elif re.fullmatch(r"(-D|--define-macro=)[A-Za-z_]\w*(=.*)?", opt):
            out.append("-D" + opt.split("=", 1)[1] if opt.startswith("--") else opt)
        else:
            raise ValueError(f"options: {opt!r} has no meaning in the emulation (only --std, -D)")
    return out


def _build(unit: str, flags: list[str], suffix: str) -> Path:
    """Compile ``unit`` once per content (cached; atomic rename, so racing builds agree)."""
    cxx = compiler()
    if cxx is None:
        raise EmulationError("g++ is not installed: the CUDA emulation cannot build")
    key = hashlib.sha256(
        "\0".join([unit, HEADER.read_text(), *flags, _compiler_version(cxx)]).encode()
    ).hexdigest()[:24]
    cache = _cache_dir()
    target = cache / f"cuemu-{key}{suffix}"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / "unit.cpp", Path(tmp) / f"out{suffix}"
        src.write_text(unit)
        cmd = [cxx, *flags, "-o", str(out), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise EmulationError(f"g++ failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}")
        os.replace(out, target)
    return target


# ---------------------------------------------------------------------- arguments
def _dims(what: str, dims: Any) -> tuple[int, int, int]:
    if not isinstance(dims, tuple | list) or not 1 <= len(dims) <= 3:
        raise TypeError(f"{what}: expected a tuple of 1 to 3 ints, got {dims!r}")
    if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{what}: expected ints, got {dims!r}")
    full = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if min(full) < 1:
        raise EmulationError(f"{what}: invalid configuration argument {dims!r} (a zero size)")
    return full  # type: ignore[return-value]


def _pointer(i: int, arg: Any) -> tuple[int, int]:
    """(address, nbytes) of a "device" array argument."""
    if isinstance(arg, np.ndarray):
        if not (arg.flags.c_contiguous or arg.flags.f_contiguous):
            raise ValueError(f"args[{i}]: expected a contiguous array, got strides {arg.strides}")
        return int(arg.ctypes.data), int(arg.nbytes)
    face = getattr(arg, "__cuda_array_interface__", None) or getattr(
        arg, "__array_interface__", None
    )
    if isinstance(face, dict) and face.get("strides") is None:
        size = int(np.prod(face["shape"], dtype=np.int64)) * np.dtype(face["typestr"]).itemsize
        return int(face["data"][0]), size
    raise TypeError(f"args[{i}]: expected an array for a pointer parameter, got {type(arg)}")


def _value(i: int, arg: Any, code: str) -> bytes:
    """The bytes of a value parameter; its NumPy type must be the kernel's parameter type."""
    want = np.dtype(code)
    if not isinstance(arg, np.generic) or arg.dtype != want:
        got = arg.dtype if isinstance(arg, np.generic) else type(arg).__name__
        raise TypeError(f"args[{i}]: expected a NumPy scalar of type {want}, got {got}")
    return arg.tobytes()


# ---------------------------------------------------------------------- module and kernels
class EmulatedModule:
    """A ``cupy.RawModule`` stand-in that runs its kernels on the CPU (see module docs).

    ``code``: the CUDA source text; ``options``: NVRTC options (``--std=…``, ``-D…``);
    ``sanitize``: None (in-process), ``"thread"`` or ``"address"`` (address + undefined).
    ``launches`` records every launch of this module's kernels, in order.
    """

    def __init__(
        self, code: str, options: tuple[str, ...] = (), sanitize: str | None = None
    ) -> None:
        if sanitize not in (None, *_SANITIZERS):
            raise ValueError(f"sanitize: expected None or one of {_SANITIZERS}, got {sanitize!r}")
        self.sanitize = sanitize
        self.launches: list[Launch] = []
        unit, names = translate(code)
        flags = [*_COMMON, *_options(options), *_FLAGS[sanitize]]
        if sanitize is None:
            self._lib: Any = ctypes.CDLL(str(_build(unit, flags, ".so")))
            self._exe: Path | None = None
            lib = self._lib
            lib.cuemu_name.restype = lib.cuemu_signature.restype = ctypes.c_char_p
            lib.cuemu_name.argtypes = lib.cuemu_signature.argtypes = [ctypes.c_int]
            lib.cuemu_launch.restype = ctypes.c_int
            lib.cuemu_launch.argtypes = [
                ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                ctypes.c_ulonglong,
            ]  # fmt: skip
            table = [
                (lib.cuemu_name(i).decode(), lib.cuemu_signature(i).decode())
                for i in range(lib.cuemu_count())
            ]
        else:  # the executable lists its kernels itself
            self._lib, self._exe = None, _build(unit, flags, f"-{sanitize}.exe")
            listing = subprocess.run(
                [str(self._exe), "--signatures"], capture_output=True, text=True,
                env={**os.environ, **_SANITIZER_ENV}, check=True,
            ).stdout  # fmt: skip
            table = [(line.split(" ")[0], line.partition(" ")[2]) for line in listing.splitlines()]
        self._signatures = {
            name: (i, [c for c in sig.split(",") if c]) for i, (name, sig) in enumerate(table)
        }
        assert list(self._signatures) == names, (list(self._signatures), names)

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """The ``extern "C" __global__`` kernels of the source, in source order."""
        return tuple(self._signatures)

    def get_function(self, name: str) -> EmulatedKernel:
        """The kernel ``name`` (KeyError, as CuPy's lookup error, when it is absent)."""
        if name not in self._signatures:
            raise KeyError(f"name: expected one of {list(self._signatures)}, got {name!r}")
        index, signature = self._signatures[name]
        return EmulatedKernel(self, name, index, signature)


class EmulatedKernel:
    """One kernel; called as ``cupy.RawKernel``: ``fn(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: EmulatedModule, name: str, index: int, signature: list[str]):
        self.module, self.name, self.index = module, name, index
        #: parameter type codes: "p" (pointer), "i4", "i8", "u1", "f4", "f8", …
        self.signature = tuple(signature)

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0
    ) -> None:
        g, b = _dims("grid", grid), _dims("block", block)
        if b[0] * b[1] * b[2] > _MAX_BLOCK_THREADS or b[2] > 64 or max(g[1], g[2]) > 65535:
            raise EmulationError(f"{self.name}: invalid configuration grid {grid} block {block}")
        if not 0 <= int(shared_mem) <= _MAX_DYNAMIC_SHARED:
            raise EmulationError(
                f"{self.name}: shared_mem {shared_mem} outside 0..{_MAX_DYNAMIC_SHARED} bytes"
            )
        if not isinstance(args, tuple | list) or len(args) != len(self.signature):
            got = len(args) if isinstance(args, tuple | list) else repr(args)
            raise TypeError(
                f"{self.name}: expected {len(self.signature)} arguments "
                f"({','.join(self.signature)}), got {got}"
            )
        spec = [
            _pointer(i, a) if code == "p" else _value(i, a, code)
            for i, (a, code) in enumerate(zip(args, self.signature))
        ]
        self.module.launches.append(Launch(self.name, g, b, int(shared_mem)))
        if self.module.sanitize is None:
            self._run_here(g, b, int(shared_mem), spec)
        else:
            self._run_sanitized(g, b, int(shared_mem), spec)

    def _run_here(self, g: tuple, b: tuple, shmem: int, spec: list) -> None:
        keep = [
            ctypes.c_void_p(s[0]) if isinstance(s, tuple) else ctypes.create_string_buffer(s)
            for s in spec
        ]
        argv = (ctypes.c_void_p * max(1, len(spec)))(*[ctypes.addressof(k) for k in keep])
        err = ctypes.create_string_buffer(8192)
        rc = self.module._lib.cuemu_launch(
            self.index, (ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shmem, argv, err, 8192
        )
        if rc:
            raise EmulationError(f"{self.name}: {err.value.decode(errors='replace')}")

    def _run_sanitized(self, g: tuple, b: tuple, shmem: int, spec: list) -> None:
        # merge the arrays' byte ranges into buffers (aliasing arguments share one)
        spans = sorted({(s[0], s[0] + s[1]) for s in spec if isinstance(s, tuple)})
        bufs: list[list[int]] = []
        for lo, hi in spans:
            if bufs and lo < bufs[-1][1]:
                bufs[-1][1] = max(bufs[-1][1], hi)
            else:
                bufs.append([lo, hi])
        req = [struct.pack("<I3I3IQ", self.index, *g, *b, shmem), struct.pack("<I", len(bufs))]
        before = [ctypes.string_at(lo, hi - lo) for lo, hi in bufs]
        for data in before:
            req += [struct.pack("<Q", len(data)), data]
        req.append(struct.pack("<I", len(spec)))
        for s in spec:
            if isinstance(s, tuple):
                k = next(k for k, (lo, hi) in enumerate(bufs) if lo <= s[0] <= hi)
                req.append(struct.pack("<BIQ", 0, k, s[0] - bufs[k][0]))
            else:
                req.append(struct.pack("<BI", 1, len(s)) + s)
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = Path(tmp) / "request", Path(tmp) / "result"
            inp.write_bytes(b"".join(req))
            try:
                res = subprocess.run(
                    [str(self.module._exe), str(inp), str(out)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    env={**os.environ, **_SANITIZER_ENV},
                )
            except subprocess.TimeoutExpired as exc:
                raise EmulationError(f"{self.name}: no result after 300 s (a hang?)") from exc
            report = res.stderr.strip()
            if res.returncode == 3:
                raise EmulationError(f"{self.name}: {report.removeprefix('cuemu error: ')}")
            if res.returncode != 0 or any(m in report for m in _SANITIZER_MARKS):
                raise SanitizerError(
                    f"{self.name} under sanitize={self.module.sanitize!r} "
                    f"(exit {res.returncode}):\n{report[-12000:]}"
                )
            result = out.read_bytes()
        pos = 0
        for (lo, hi), old in zip(bufs, before):
            new = result[pos : pos + hi - lo]
            pos += hi - lo
            if new != old:  # write back only what changed (inputs may be read-only)
                ctypes.memmove(lo, new, hi - lo)
