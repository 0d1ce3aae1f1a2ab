"""The CUDA kernels executed on the CPU under minipeft.kernels.cuda.emulate.

Part 1 runs the unchanged launchers (quant4.py, gemv4.py, sgmv.py) against a minimal
device stand-in (``cupy`` → NumPy arrays in fresh 256-byte-aligned buffers, as CuPy
allocates, with ``.data.ptr``; ``load_module`` → :class:`EmulatedModule`), over every launch
path, and compares with the NumPy references: quant4 bit for bit, gemv4 within
γ_{in+2}·Σ|ŵx| of float64, sgmv within a float tolerance. Every kernel also runs once under
ThreadSanitizer and once under AddressSanitizer + UBSan. The last test asserts that every
kernel of every ``.cu`` ran, and prints the table kernel × launch path (written to the file
named by ``$MINIPEFT_EMULATION_TABLE`` when set).

Part 2 tests the emulation itself with tiny deliberately broken kernels: each fault must be
a detected error or a wrong answer — never a silent pass, never a hang.
"""

from __future__ import annotations

import os
import threading
import types
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from minipeft.kernels.cpu.gemv4 import gemv_4bit_reference
from minipeft.kernels.cuda import gemv4, quant4, sgmv, source_path, sources
from minipeft.kernels.cuda.emulate import (
    EmulatedModule,
    EmulationError,
    SanitizerError,
    compiler,
    translate,
)
from minipeft.peft.serving import lora_mixed_delta_reference, stack_adapters
from minipeft.quant.blockwise import dequantize_4bit, quantize_4bit
from minipeft.quant.codebooks import decision_boundaries, get_codebook

pytestmark = pytest.mark.skipif(
    compiler() is None, reason="g++ not installed: the CUDA emulation compiles with it"
)

#: (kernel, launch path) -> launches, filled by the tests of part 1
EXECUTED: dict[tuple[str, str], int] = defaultdict(int)


# ---------------------------------------------------------------- the device stand-in
class DevArray(np.ndarray):
    """A NumPy array playing device memory: ``.data.ptr`` as CuPy's."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.ctypes.data)

    def get(self) -> np.ndarray:  # device -> host copy, as cupy.ndarray.get
        return np.array(self)


def _device_copy(a, dtype=None) -> DevArray:
    host = np.asarray(a, dtype=dtype)
    raw = np.empty(host.nbytes + 256, np.uint8)
    off = -raw.ctypes.data % 256  # CuPy's allocations are 256-byte aligned
    dev = raw[off : off + host.nbytes].view(host.dtype).reshape(host.shape).view(DevArray)
    dev[...] = host
    return dev


def _asarray(a, dtype=None):
    same = dtype is None or np.dtype(dtype) == a.dtype
    return a if isinstance(a, DevArray) and same else _device_copy(a, dtype)


def _ascontiguousarray(a, dtype=None):
    same = dtype is None or np.dtype(dtype) == a.dtype
    ok = isinstance(a, DevArray) and same and a.flags.c_contiguous
    return a if ok else _device_copy(np.ascontiguousarray(a), dtype)


FAKE_CUPY = types.ModuleType("cupy")
FAKE_CUPY.__dict__.update(
    ndarray=DevArray,
    asarray=_asarray,
    ascontiguousarray=_ascontiguousarray,
    empty=lambda shape, dtype=np.float64: _device_copy(np.empty(shape, dtype)),
    zeros=lambda shape, dtype=np.float64: _device_copy(np.zeros(shape, dtype)),
    isfinite=np.isfinite,
    float32=np.float32,
    float64=np.float64,
    int32=np.int32,
    int64=np.int64,
    uint8=np.uint8,
)

_MODULES: dict[tuple[str, str | None], EmulatedModule] = {}
MODES = (None, "thread", "address")


def _module(name: str, sanitize: str | None = None) -> EmulatedModule:
    key = (name, sanitize)
    if key not in _MODULES:
        _MODULES[key] = EmulatedModule(
            source_path(name).read_text(), ("--std=c++17",), sanitize=sanitize
        )
    return _MODULES[key]


@pytest.fixture(scope="module", autouse=True)
def _prebuilt():
    """Every build this file needs, compiled in parallel (cached across runs anyway)."""
    jobs = [(_module, name, mode) for name in ("quant4", "gemv4", "sgmv") for mode in MODES]
    jobs += [(_tiny, "reduce", mode) for mode in MODES]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(lambda job: job[0](job[1], job[2]), jobs))


@pytest.fixture
def device(monkeypatch):
    """Route the launchers to the stand-in; yields ``run(path, sanitize, fn, *args)``."""
    monkeypatch.setitem(__import__("sys").modules, "cupy", FAKE_CUPY)
    current: dict[str, str | None] = {"sanitize": None}
    for mod in (quant4, gemv4, sgmv):
        monkeypatch.setattr(
            mod, "load_module", lambda name, *_a, **_k: _module(name, current["sanitize"])
        )

    def run(path: str, sanitize: str | None, fn, *args, **kwargs):
        current["sanitize"] = sanitize
        before = {k: len(m.launches) for k, m in _MODULES.items()}
        out = fn(*args, **kwargs)
        label = path + ("" if sanitize is None else f" [{sanitize}]")
        for k, m in _MODULES.items():
            for launch in m.launches[before.get(k, 0) :]:
                EXECUTED[(launch.kernel, label)] += 1
        return out

    return run


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint32)


# ---------------------------------------------------------------- quant4
def _signal(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[64:96] = 0.0  # an all-zero stretch: a zero absmax where a block falls inside it
    return x


QUANT_CASES = [  # (n, blocksize, quant_type, path)
    (2048, 64, "nf4", "full blocks, whole thread blocks"),
    (1001, 64, "fp4", "odd n, short last block, tail thread block"),
    (50, 128, "nf4", "n < blocksize (one short block)"),
    (640, 32, "int4", "blocksize 32, zero block"),
]


@pytest.mark.parametrize(("n", "blocksize", "quant_type", "path"), QUANT_CASES)
def test_quant4_matches_reference_bit_for_bit(device, n, blocksize, quant_type, path):
    x = _signal(n, n)
    code = get_codebook(quant_type)
    order, mids = decision_boundaries(code)
    packed, absmax = device(path, None, quant4.quantize_4bit, _asarray(x), blocksize, mids, order)
    ref_packed, state = quantize_4bit(x, blocksize, quant_type, impl="reference")
    assert np.array_equal(_bits(absmax), _bits(state.absmax))
    assert np.array_equal(np.asarray(packed), ref_packed)
    xhat = device(path, None, quant4.dequantize_4bit, packed, absmax, code, blocksize, n)
    ref = dequantize_4bit(ref_packed, state, impl="reference").reshape(-1)
    assert np.array_equal(_bits(xhat), _bits(ref))


def test_quant4_dequantize_nested_scales(device):
    """Double-quantized absmax rebuilt by the reference, then the kernel dequantizes."""
    n, blocksize = 64 * 300 + 6, 64  # 301 blocks: two second-level blocks, a short last one
    x = _signal(n, 7)
    packed, state = quantize_4bit(x, blocksize, "nf4", double_quant=True, impl="reference")
    scales = state.block_scales()
    path = "nested (double-quant) scales"
    xhat = device(path, None, quant4.dequantize_4bit, _asarray(packed), scales, state.code,
                  blocksize, n)  # fmt: skip
    ref = dequantize_4bit(packed, state, impl="reference").reshape(-1)
    assert np.array_equal(_bits(xhat), _bits(ref))


# ---------------------------------------------------------------- gemv4
GEMV_CASES = [  # (out, in, blocksize, nested, batch, misaligned x, expected kernel, path)
    (10, 256, 64, False, 1, False, "gemv4_rows", "aligned, plain absmax, batch 1"),
    (9, 2048, 64, True, 2, False, "gemv4_rows", "aligned, nested, batch 2, 2 chunks/lane"),
    (6, 100, 64, False, 1, False, "gemv4_generic", "in % B != 0, plain, batch 1"),
    (5, 99, 32, True, 3, False, "gemv4_generic", "odd in, nested, batch 3"),
    (8, 128, 64, False, 2, True, "gemv4_generic", "misaligned x, plain, batch 2"),
]


@pytest.mark.parametrize(
    ("out_f", "in_f", "blocksize", "nested", "batch", "misaligned", "kernel", "path"), GEMV_CASES
)
def test_gemv4_within_float32_bound(
    device, out_f, in_f, blocksize, nested, batch, misaligned, kernel, path
):
    rng = np.random.default_rng(out_f * in_f)
    W = rng.standard_normal((out_f, in_f)).astype(np.float32)
    packed, state = quantize_4bit(W, blocksize, "nf4", double_quant=nested, impl="reference")
    x = rng.standard_normal((batch, in_f) if batch > 1 else (in_f,)).astype(np.float32)
    if misaligned:  # the same values one float into an aligned buffer
        xd = _device_copy(np.concatenate([[0.0], x.reshape(-1)]).astype(np.float32))[1:]
        xd = xd.reshape(x.shape)
    else:
        xd = _asarray(x)
    mod = _module("gemv4")
    before = len(mod.launches)
    y = device(path, None, gemv4.gemv_4bit, _asarray(packed), state, xd)
    assert [launch.kernel for launch in mod.launches[before:]] == [kernel]
    # float64 of the same dequantized weights; bound γ_{in+2}·Σ|ŵ x| (qlora.gemv4)
    w_hat = gemv_4bit_reference(packed, state.block_scales(), state.code, blocksize,
                                (out_f, in_f), np.eye(in_f, dtype=np.float32))  # fmt: skip
    xs = x.reshape(-1, in_f).astype(np.float64)
    ref = xs @ w_hat.astype(np.float64).T  # (B, out)
    u, k = 2.0**-24, in_f + 2
    bound = k * u / (1 - k * u) * (np.abs(xs) @ np.abs(w_hat.astype(np.float64)).T)
    got = np.asarray(y, dtype=np.float64).reshape(ref.shape)
    assert np.asarray(y).shape == ((out_f,) if batch == 1 else (batch, out_f))
    assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / bound)


# ---------------------------------------------------------------- sgmv
def _sgmv_case(dtype, ranks, d_in, d_out, ids, seed):
    rng = np.random.default_rng(seed)
    adapters = [
        (rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), 0.5 + a)
        for a, r in enumerate(ranks)
    ]
    stack = stack_adapters(adapters, r_max=max(ranks), dtype=dtype)
    x = rng.standard_normal((len(ids), d_in)).astype(dtype)
    base = rng.standard_normal((len(ids), d_out)).astype(dtype)  # y = x W0ᵀ on entry
    return stack, x, base, np.asarray(ids, dtype=np.int64)


SGMV_CASES = [  # (dtype, ranks, d_in, d_out, ids, path)
    (np.float32, [6, 0, 3], 40, 300, [0, -1, 1, 2, 0], "f32, ranks r_max/0/mixed, id -1"),
    (np.float64, [6, 0, 3], 40, 300, [0, -1, 1, 2, 0], "f64, ranks r_max/0/mixed, id -1"),
    (np.float32, [5], 33, 7, [0], "f32, one row, rank r_max"),
    (np.float64, [2, 4], 64, 256, [-1, -1, 1], "f64, leading rows without adapter"),
    (np.float32, [0, 0], 16, 8, [0, 1, -1], "f32, r_max = 0 (no launch)"),
]


@pytest.mark.parametrize(("dtype", "ranks", "d_in", "d_out", "ids", "path"), SGMV_CASES)
def test_sgmv_matches_reference(device, dtype, ranks, d_in, d_out, ids, path):
    stack, x, base, ids_np = _sgmv_case(dtype, ranks, d_in, d_out, ids, len(path))
    out = _asarray(base)
    device(path, None, sgmv.sgmv_lora_delta_cuda, _asarray(x), _asarray(stack.A),
           _asarray(stack.B), _asarray(stack.scaling), _asarray(stack.ranks),
           _asarray(ids_np), out=out)  # fmt: skip
    ref = lora_mixed_delta_reference(x, stack, ids_np, out=base.copy())
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(np.asarray(out), ref, rtol=tol, atol=tol * d_in)
    untouched = ids_np < 0
    assert np.array_equal(np.asarray(out)[untouched], base[untouched])  # bit for bit


# ---------------------------------------------------------------- under the sanitizers
@pytest.mark.parametrize("sanitize", ["thread", "address"])
def test_every_kernel_clean_under_sanitizer(device, sanitize):
    """One small launch of each kernel: no race, no out-of-bounds, no misaligned access."""
    x = _signal(301, 3)
    code = get_codebook("nf4")
    order, mids = decision_boundaries(code)
    path = "odd n, short last block"
    packed, absmax = device(path, sanitize, quant4.quantize_4bit, _asarray(x), 64, mids, order)
    ref_packed, state = quantize_4bit(x, 64, "nf4", impl="reference")
    assert np.array_equal(np.asarray(packed), ref_packed)
    xhat = device(path, sanitize, quant4.dequantize_4bit, packed, absmax, code, 64, 301)
    assert np.array_equal(_bits(xhat), _bits(dequantize_4bit(ref_packed, state, impl="reference")))
    rng = np.random.default_rng(1)
    for in_f, path in ((128, "aligned, nested, batch 2"), (96, "in % B != 0, nested, batch 2")):
        W = rng.standard_normal((5, in_f)).astype(np.float32)
        p, st = quantize_4bit(W, 64, "nf4", double_quant=True, impl="reference")
        xv = rng.standard_normal((2, in_f)).astype(np.float32)
        y = device(path, sanitize, gemv4.gemv_4bit, _asarray(p), st, _asarray(xv))
        ref = xv @ dequantize_4bit(p, st, impl="reference").T
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    for dtype in (np.float32, np.float64):
        stack, xs, base, ids = _sgmv_case(dtype, [3, 0, 2], 40, 260, [0, -1, 1, 2], 5)
        out = _asarray(base)
        label = f"{np.dtype(dtype).name[0]}{np.dtype(dtype).itemsize * 8}, mixed ranks, id -1"
        device(label, sanitize, sgmv.sgmv_lora_delta_cuda, _asarray(xs), _asarray(stack.A),
               _asarray(stack.B), _asarray(stack.scaling), _asarray(stack.ranks),
               _asarray(ids), out=out)  # fmt: skip
        ref = lora_mixed_delta_reference(xs, stack, ids, out=base.copy())
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- part 2: the emulation
# Tiny kernels k(float* out, const float* in, int n), each deliberately right or wrong; all
# in one source per build (in-process, ThreadSanitizer, ASan + UBSan): three compiles.
REDUCE = """
    __shared__ float s[64];
    s[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        BARRIER
    }
    if (threadIdx.x == 0) out[0] = s[0];
"""
WARP_SUM = """
    float v = in[threadIdx.x];
    for (int d = 16; d > 0; d STEP) v += __shfl_down_sync(0xffffffffu, v, d);
    out[threadIdx.x] = v;
"""
TINY = {
    "reduce": REDUCE.replace("BARRIER", "__syncthreads();"),
    "reduce_no_barrier": REDUCE.replace("BARRIER", ""),
    "early_return": "if (threadIdx.x >= 16) return;\n__syncthreads();\nout[threadIdx.x] = 1.0f;",
    "divergent": "if (threadIdx.x < 16) {\n__syncthreads();\n} else {\n__syncthreads();\n}",
    "deadlock": """
    float v = in[threadIdx.x];
    if (threadIdx.x == 0) __syncthreads();
    v = __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;""",
    "warp_sum": WARP_SUM.replace("STEP", ">>= 1"),
    "warp_sum_wrong_delta": WARP_SUM.replace("STEP", ">>= 2"),  # deltas 16, 4, 1
    "shfl_caller_not_in_mask": (
        "out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, in[threadIdx.x], 1);"),
    "shfl_reads_outside_mask": (
        "if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffu, in[threadIdx.x], 8);"),
    "shfl_lane_exited": ("if (threadIdx.x >= 16) return;\n"
                         "out[threadIdx.x] = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);"),
    "shfl_lane_absent": "out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, in[threadIdx.x], 1);",
    "shfl_different_sites": ("if (threadIdx.x < 8) out[threadIdx.x] = __shfl_sync(~0u, in[0], 0);\n"
                             "else out[threadIdx.x] = __shfl_sync(~0u, in[1], 0);"),
    "oob_write": "out[threadIdx.x + 1] = in[threadIdx.x];",
    "oob_read": "out[threadIdx.x] = in[threadIdx.x + 1];",
    "oob_shared": "__shared__ float t[16];\nt[threadIdx.x + 1] = 1.0f;",
    "dynamic": "extern __shared__ float d[];\nd[threadIdx.x] = 1.0f;",
    "misaligned": ("const float4 v = reinterpret_cast<const float4*>(in + 1)[0];\n"
                   "out[threadIdx.x] = v.x;"),
    "poison": "__shared__ float p[32];\nout[threadIdx.x] = p[threadIdx.x];",
    "tiles_2d": """
    extern __shared__ unsigned char raw[];
    float* tile = reinterpret_cast<float*>(raw);
    const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
    const int b = blockIdx.y * gridDim.x + blockIdx.x;
    tile[t] = in[b * nt + t];
    __syncthreads();
    out[b * nt + t] = tile[nt - 1 - t] + 1000.0f * (gridDim.x * 10 + gridDim.y);""",
}  # fmt: skip
_TINY_MODULES: dict[str | None, EmulatedModule] = {}


def _tiny(name: str, sanitize: str | None = None):
    if sanitize not in _TINY_MODULES:
        code = "".join(
            f'extern "C" __global__ void {k}(float* out, const float* in, int n) {{\n{body}\n}}\n'
            for k, body in TINY.items()
        )
        _TINY_MODULES[sanitize] = EmulatedModule(code, sanitize=sanitize)
    return _TINY_MODULES[sanitize].get_function(name)


def _within(seconds: float, fn, *args, **kwargs):
    """fn(*args) in a daemon thread: a hang fails the test instead of blocking it."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"launch still running after {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def _launch(name, n_threads, sanitize=None, in_=None, shared_mem=0):
    in_ = np.arange(n_threads, dtype=np.float32) if in_ is None else in_
    out = np.zeros(n_threads, np.float32)
    fn = _tiny(name, sanitize)
    _within(60, fn, (1,), (n_threads,), (out, in_, np.int32(in_.size)), shared_mem=shared_mem)
    return out


@pytest.mark.parametrize("sanitize", [None, "thread", "address"])
def test_correct_reduction_passes(sanitize):
    assert _launch("reduce", 64, sanitize)[0] == np.arange(64).sum()


def test_missing_syncthreads_is_a_data_race():
    with pytest.raises(SanitizerError, match="data race"):
        _launch("reduce_no_barrier", 64, "thread")


@pytest.mark.parametrize(
    ("name", "n_threads", "message"),
    [
        ("early_return", 32, r"early_return: block \(0,0,0\), thread \(\d+,0,0\).*exited"),
        ("divergent", 32, "divergent barrier"),
        ("deadlock", 32, "deadlock: every live thread waits"),
        ("shfl_caller_not_in_mask", 32, "does not name it"),
        ("shfl_reads_outside_mask", 32, "reads lane 16, which is not in the mask"),
        ("shfl_lane_exited", 32, r"exited"),
        ("shfl_lane_absent", 31, "mask names lane 31, absent"),
        ("shfl_different_sites", 32, "lanes of one warp at different shuffles"),
    ],
)
def test_broken_synchronization_is_an_error_not_a_hang(name, n_threads, message):
    with pytest.raises(EmulationError, match=message):
        _launch(name, n_threads)


def test_shuffle_reduction_and_a_wrong_delta():
    good = _launch("warp_sum", 64)
    assert good[0] == np.arange(32).sum() and good[32] == np.arange(32, 64).sum()
    assert good[31] == 31 * 32  # a source past the warp: the lane's own value, 5 doublings
    wrong = _launch("warp_sum_wrong_delta", 64)
    assert wrong[0] != good[0]  # caught as a wrong answer, deterministically
    assert np.array_equal(wrong, _launch("warp_sum_wrong_delta", 64))


@pytest.mark.parametrize(
    ("name", "shared_mem", "message"),
    [
        ("oob_write", 0, "heap-buffer-overflow"),
        ("oob_read", 0, "heap-buffer-overflow"),
        ("oob_shared", 0, r"index 16 out of bounds for type 'float \[16\]'"),
        ("dynamic", 60, "heap-buffer-overflow"),  # 15 floats for 16 threads
        ("misaligned", 0, "misaligned address"),
    ],
)
def test_out_of_bounds_and_misaligned_accesses_are_reported(name, shared_mem, message):
    in_ = _device_copy(np.arange(16, dtype=np.float32))  # 256-aligned, as on a device
    with pytest.raises(SanitizerError, match=message):
        _launch(name, 16, "address", in_=in_, shared_mem=shared_mem)


def test_dynamic_shared_memory_in_bounds_is_clean():
    assert _launch("dynamic", 16, "address", shared_mem=64).sum() == 0  # 16 floats: fine


def test_dynamic_shared_memory_2d_grid_and_dims():
    """Each block reverses its tile through dynamic shared memory; 2-D grid and block."""
    grid, block = (3, 2), (4, 8)
    x = np.arange(6 * 32, dtype=np.float32)
    out = np.zeros_like(x)
    _within(30, _tiny("tiles_2d"), grid, block, (out, x, np.int32(x.size)), shared_mem=32 * 4)
    expect = x.reshape(6, 32)[:, ::-1].reshape(-1) + 1000.0 * 32
    assert np.array_equal(out, expect)


def test_shared_memory_starts_as_garbage():
    assert np.isnan(_launch("poison", 32)).all()  # 0xFF bytes: read before written, NaN


def test_arguments_are_checked_as_the_kernel_declares_them():
    fn = _tiny("poison")
    assert fn.signature == ("p", "p", "i4")
    out, x = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="int32"):
        fn((1,), (4,), (out, x, np.int64(4)))  # CuPy would pass 8 bytes for a 4-byte int
    with pytest.raises(TypeError, match="int32"):
        fn((1,), (4,), (out, x, 4))
    with pytest.raises(TypeError, match="3 arguments"):
        fn((1,), (4,), (out, x))
    with pytest.raises(EmulationError, match="invalid configuration"):
        fn((1,), (2048,), (out, x, np.int32(4)))


def test_translation_keeps_line_numbers():
    code = source_path("sgmv").read_text()
    unit, names = translate(code)
    body = unit.split("\n", 2)[2]  # after the #include and #line directives
    assert body.count("\n") >= code.count("\n")
    assert "__shared__" not in body.split("static const ::cuemu::Entry")[0]
    assert names == ["sgmv_shrink_f32", "sgmv_shrink_f64", "sgmv_expand_f32", "sgmv_expand_f64"]


# ---------------------------------------------------------------- coverage (keep last)
def test_every_kernel_of_every_source_was_executed():
    """The table kernel × launch path; every ``extern "C" __global__`` kernel is in it."""
    everything = {n for src in sources() for n in translate(src.read_text())[1]}
    if not EXECUTED:
        pytest.skip("run the whole file: the launch-path tests fill the table")
    assert everything <= {kernel for kernel, _ in EXECUTED}, everything - set(EXECUTED)
    rows = ["| kernel | launch path | launches |", "| --- | --- | --- |"]
    rows += [f"| `{k}` | {p} | {c} |" for (k, p), c in sorted(EXECUTED.items())]
    rows.append(f"\n{len(EXECUTED)} kernel × launch path pairs, {len(everything)} kernels.")
    table = "\n".join(rows)
    print(table)
    if os.environ.get("MINIPEFT_EMULATION_TABLE"):
        with open(os.environ["MINIPEFT_EMULATION_TABLE"], "w") as fh:
            fh.write(table + "\n")
