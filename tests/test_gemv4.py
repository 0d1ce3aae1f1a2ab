"""Fused 4-bit GEMV (kernels/cpu/gemv4.py, kernels/cuda/gemv4.cu) and the fast Numba
quantize/dequantize kernels' edge cases.

GEMV expected values: Ŵ decoded here by hand (shifts, np.repeat, the 8-bit map for double
quantization) and multiplied in float64; the kernels must agree within the dot-product
bound γ_{n+2}·Σ|ŵ x| (u = 2⁻²⁴). Quantization: the Numba kernel must give the NumPy
reference's bytes exactly, on inputs built to hit every midpoint tie.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.kernels import cuda as cuda_kernels
from minipeft.kernels.cpu import gemv4
from minipeft.kernels.cpu import quant4 as cpu_quant4
from minipeft.quant import codebooks as cb
from minipeft.quant.blockwise import dequantize_4bit, quantize_4bit

U = 2.0**-24


def _decode64(packed: np.ndarray, state) -> np.ndarray:
    n = state.numel
    q = np.empty(packed.size * 2, dtype=np.int64)
    q[0::2], q[1::2] = packed >> 4, packed & 15  # high nibble first
    if state.state2 is None:
        c = state.absmax.astype(np.float32)
    else:
        s2 = state.state2
        a2 = np.repeat(s2.absmax, s2.blocksize)[: state.absmax.size]
        c = (s2.code[state.absmax] * a2).astype(np.float32) + np.float32(s2.offset)
    w = state.code[q[:n]] * np.repeat(c, state.blocksize)[:n]  # float32 products
    return w.astype(np.float64).reshape(state.shape)


def _assert_within_bound(y: np.ndarray, w64: np.ndarray, x: np.ndarray) -> None:
    x64 = np.asarray(x, dtype=np.float64)
    ref = x64 @ w64.T  # (…, out)
    mag = np.abs(x64) @ np.abs(w64.T)
    k = w64.shape[1] + 2
    gamma = k * U / (1 - k * U)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= gamma * mag + 1e-30)


CASES = [
    # (out, in, blocksize, quant_type, double_quant): rows of whole blocks → SIMD path
    (32, 256, 64, "nf4", False),
    (17, 128, 32, "fp4", False),
    (8, 512, 128, "int4", True),
    (40, 256, 256, "nf4", True),
    (6, 640, 64, "nf4", True),  # four-group calls and a single-group tail
    (5, 1024, 1024, "fp4", False),
    # rows straddling blocks → portable path
    (7, 50, 64, "nf4", False),
    (5, 33, 32, "fp4", True),
    (3, 1, 64, "nf4", False),
]


@pytest.mark.parametrize(("out_f", "in_f", "bs", "qt", "dq"), CASES)
@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_gemv_matches_float64_dequantized(out_f, in_f, bs, qt, dq, impl):
    rng = np.random.default_rng(out_f * 1000 + in_f)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    x = rng.standard_normal(in_f).astype(np.float32)
    packed, state = quantize_4bit(w, bs, qt, dq)
    y = gemv4.gemv_4bit(packed, state, x, impl=impl)
    _assert_within_bound(y, _decode64(packed, state), x)


def test_gemv_batch_rows_and_layouts():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    packed, state = quantize_4bit(w, 64, "nf4")
    xb = rng.standard_normal((3, 256)).astype(np.float32)[:, ::2]  # non-contiguous (3, 128)
    ro = packed.copy()
    ro.flags.writeable = False  # read-only codes (as from a memory-mapped file)
    y = gemv4.gemv_4bit(ro, state, xb)
    assert y.shape == (3, 24)
    _assert_within_bound(y, _decode64(packed, state), xb)
    y64 = gemv4.gemv_4bit(packed, state, xb[0].astype(np.float64))  # float64 x is cast
    _assert_within_bound(y64, _decode64(packed, state), xb[0])


@pytest.mark.skipif(gemv4.simd_width() == 0, reason="no AVX2/AVX-512 permute kernel on this CPU")
def test_simd_and_portable_kernels_agree():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    x = rng.standard_normal(256).astype(np.float32)
    for dq in (False, True):
        packed, state = quantize_4bit(w, 64, "nf4", dq)
        parts = gemv4._dq_parts(state)
        code = gemv4._ro(state.code, np.float32)
        ys = []
        for fn in (gemv4._gemv_simd, gemv4._gemv_portable):
            y = np.empty(16, np.float32)
            fn(gemv4._ro(packed, np.uint8), *parts, code, 64, 16, 256, gemv4._ro(x, np.float32), y)
            ys.append(y)
        w64 = _decode64(packed, state)
        for y in ys:
            _assert_within_bound(y, w64, x)


@pytest.mark.skipif(gemv4.simd_width() < 16, reason="the AVX2 kernel is run here on AVX-512 CPUs")
def test_avx2_kernel_on_an_avx512_cpu():
    """The 8-lane (AVX2: two permutes and a select on bit 3) GEMV, built for this test."""
    fn = gemv4.make_gemv_simd(8)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 256)).astype(np.float32)
    x = rng.standard_normal(256).astype(np.float32)
    for bs, dq in ((32, False), (64, True), (256, False)):
        packed, state = quantize_4bit(w, bs, "fp4", dq)
        y = np.empty(12, np.float32)
        fn(gemv4._ro(packed, np.uint8), *gemv4._dq_parts(state), gemv4._ro(state.code, np.float32),
           bs, 12, 256, gemv4._ro(x, np.float32), y)  # fmt: skip
        _assert_within_bound(y, _decode64(packed, state), x)


@settings(max_examples=25)
@given(
    out_f=st.integers(1, 12),
    blocks=st.integers(1, 4),
    bs=st.sampled_from([32, 64]),
    extra=st.sampled_from([0, 0, 1, 7]),
    qt=st.sampled_from(["nf4", "fp4", "int4"]),
    dq=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemv_property(out_f, blocks, bs, extra, qt, dq, seed):
    in_f = blocks * bs + extra
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_f, in_f)) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    x = rng.standard_normal(in_f).astype(np.float32)
    packed, state = quantize_4bit(w, bs, qt, dq)
    _assert_within_bound(gemv4.gemv_4bit(packed, state, x), _decode64(packed, state), x)


def test_gemv_zero_blocks():
    w = np.zeros((4, 128), np.float32)
    w[2, 64:] = np.linspace(-1, 1, 64)
    packed, state = quantize_4bit(w, 64, "nf4")
    x = np.ones(128, np.float32)
    y = gemv4.gemv_4bit(packed, state, x)
    assert np.all(np.isfinite(y)) and y[0] == 0.0 and y[1] == 0.0
    _assert_within_bound(y, _decode64(packed, state), x)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda p, s, x: gemv4.gemv_4bit(p, "state", x), TypeError, "state"),
        (lambda p, s, x: gemv4.gemv_4bit(p, s, x, impl="fast"), ValueError, "impl"),
        (lambda p, s, x: gemv4.gemv_4bit(p[:-1], s, x), ValueError, "packed"),
        (lambda p, s, x: gemv4.gemv_4bit(p.astype(np.int8), s, x), ValueError, "packed"),
        (lambda p, s, x: gemv4.gemv_4bit(p, s, x[:-1]), ValueError, "x"),
        (lambda p, s, x: gemv4.gemv_4bit(p, s, x.reshape(1, 1, -1)), ValueError, "x"),
    ],
)
def test_gemv_bad_input(call, exc, match):
    packed, state = quantize_4bit(np.ones((4, 64), np.float32), 64, "nf4")
    with pytest.raises(exc, match=match):
        call(packed, state, np.ones(64, np.float32))


def test_gemv_rejects_non_2d_state():
    packed, state = quantize_4bit(np.ones(64, np.float32), 64, "nf4")
    with pytest.raises(ValueError, match="2-D"):
        gemv4.gemv_4bit(packed, state, np.ones(64, np.float32))


def test_gemv_disabled_jit_subprocess():
    code = textwrap.dedent(
        """
        import numpy as np, numba
        assert numba.config.DISABLE_JIT
        from minipeft.kernels.cpu import gemv4
        from minipeft.quant.blockwise import quantize_4bit, dequantize_4bit
        assert gemv4.simd_width() == 0
        rng = np.random.default_rng(0)
        w = rng.standard_normal((3, 64)).astype(np.float32)
        x = rng.standard_normal(64).astype(np.float32)
        for dq in (False, True):
            p, s = quantize_4bit(w, 32, "nf4", dq)
            ref = dequantize_4bit(p, s).astype(np.float64) @ x.astype(np.float64)
            y = gemv4.gemv_4bit(p, s, x)
            assert np.max(np.abs(y - ref)) < 1e-4 * np.max(np.abs(ref)), (y, ref)
        print("OK")
        """
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


@pytest.mark.skipif(not cuda_kernels.device_available(), reason="CuPy sees no CUDA device")
@pytest.mark.parametrize(("out_f", "in_f", "bs", "qt", "dq"), CASES)
def test_cuda_gemv_matches_float64(out_f, in_f, bs, qt, dq):  # pragma: no cover - needs a GPU
    import cupy

    rng = np.random.default_rng(in_f)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    x = rng.standard_normal(in_f).astype(np.float32)
    packed, state = quantize_4bit(w, bs, qt, dq)
    y = cupy.asnumpy(gemv4.gemv_4bit(cupy.asarray(packed), state, cupy.asarray(x), impl="cuda"))
    _assert_within_bound(y, _decode64(packed, state), x)


# ------------------------------------------------------------ fast quantize kernel edges
@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("bs", [32, 64])
def test_numba_quantize_hits_every_midpoint_tie(qt, bs):
    """Scaled values exactly on each midpoint, just above and below, ±1, ±0, in full and
    short (divided) blocks: the Numba kernel gives the reference's bytes."""
    code = cb.get_codebook(qt)
    _, mids = cb.decision_boundaries(code)
    vals = np.concatenate(
        [mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
         np.array([1.0, -1.0, 0.0, -0.0], np.float32)]
    ).astype(np.float32)  # fmt: skip
    vals = np.resize(vals, (len(vals) // (bs - 1) + 1) * (bs - 1))
    blocks = vals.reshape(-1, bs - 1)
    x = np.concatenate([np.ones((blocks.shape[0], 1), np.float32), blocks], axis=1)  # c_b = 1
    x = np.concatenate([x.reshape(-1), x.reshape(-1)[: bs // 2 + 1]])  # a short, odd tail
    p_ref, s_ref = quantize_4bit(x, bs, qt)
    p_nb, s_nb = quantize_4bit(x, bs, qt, impl="numba")
    assert p_nb.tobytes() == p_ref.tobytes()
    assert s_nb.absmax.tobytes() == s_ref.absmax.tobytes()


def test_numba_dequantize_into_out_buffer():
    x = np.random.default_rng(3).standard_normal(1001).astype(np.float32)
    packed, state = quantize_4bit(x, 64, "nf4")
    out = np.full(1001, np.nan, np.float32)
    got = cpu_quant4.dequantize_4bit(packed, state.absmax, state.code, 64, 1001, out=out)
    assert got is out
    assert out.tobytes() == dequantize_4bit(packed, state).tobytes()
    with pytest.raises(ValueError, match="out"):
        cpu_quant4.dequantize_4bit(packed, state.absmax, state.code, 64, 1001, out=out[:-1])


@pytest.mark.skipif(cpu_quant4._WIDTH == 0, reason="no AVX2/AVX-512 permute kernel on this CPU")
@pytest.mark.parametrize(
    ("n", "bs", "qt"), [(4096, 32, "nf4"), (3001, 64, "fp4"), (777, 256, "int4")]
)
def test_simd_and_portable_dequantize_bit_identical(n, bs, qt):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[:bs] = 0.0  # a zero block
    x[bs + 1] = -0.0
    packed, state = quantize_4bit(x, bs, qt)
    simd = cpu_quant4.dequantize_4bit(packed, state.absmax, state.code, bs, n)
    portable = np.empty(n, np.float32)
    cpu_quant4._dequantize_kernel(packed, state.absmax, state.code, bs, n, portable, 0)
    assert simd.tobytes() == portable.tobytes() == dequantize_4bit(packed, state).tobytes()


@pytest.mark.skipif(cpu_quant4._WIDTH < 16, reason="the AVX2 kernel is run here on AVX-512 CPUs")
def test_avx2_dequantize_kernel_on_an_avx512_cpu():
    fn = cpu_quant4.make_dequantize_simd(8)
    for n, bs, qt in ((4096, 32, "nf4"), (1001, 64, "fp4"), (777, 256, "int4")):
        x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        x[:bs] = 0.0
        packed, state = quantize_4bit(x, bs, qt)
        out = np.empty(n, np.float32)
        fn(packed, state.absmax, state.code, bs, n, out)
        assert out.tobytes() == dequantize_4bit(packed, state).tobytes()
