"""Blockwise 4-bit quantization and double quantization: properties, layout, kernels, files.

Expected values come from the definitions (hand-built bytes, brute-force nearest levels,
closed-form bit counts), never from the function under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.kernels import cuda as cuda_kernels
from minipeft.quant import codebooks as cb
from minipeft.quant.blockwise import (
    VALID_BLOCKSIZES,
    QuantState,
    dequantize_4bit,
    load_4bit,
    quantize_4bit,
    save_4bit,
)
from minipeft.quant.double_quant import (
    bits_per_parameter,
    double_dequantize,
    double_quantize,
    lecture_double_dequantize,
    lecture_double_quantize,
    memory_table,
)

QTYPES = ("nf4", "fp4", "int4")


def _max_half_gap(code: np.ndarray) -> float:
    lv = cb.sorted_levels(code)
    return float(np.max(np.diff(lv)) / 2)


def _block_absmax_ref(x: np.ndarray, bs: int) -> np.ndarray:
    flat = x.astype(np.float32).reshape(-1)
    return np.array([np.abs(flat[i : i + bs]).max() for i in range(0, flat.size, bs)])


@st.composite
def arrays(draw):
    n = draw(st.integers(1, 700))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).standard_normal(n) * scale
    return x.astype(np.float32)


@given(x=arrays(), qt=st.sampled_from(QTYPES), bs=st.sampled_from([32, 64, 128]))
def test_roundtrip_error_bound(x, qt, bs):
    """|x − x̂| ≤ c_b · (largest half gap between adjacent levels), per element."""
    packed, state = quantize_4bit(x, bs, qt)
    assert packed.dtype == np.uint8 and packed.shape == ((x.size + 1) // 2,)
    xhat = dequantize_4bit(packed, state)
    assert xhat.shape == x.shape and xhat.dtype == x.dtype
    c = np.repeat(_block_absmax_ref(x, bs), bs)[: x.size].astype(np.float64)
    err = np.abs(x.astype(np.float64) - xhat)
    bound = c * _max_half_gap(cb.get_codebook(qt)) * (1 + 1e-6) + 1e-30
    assert np.all(err <= bound)


@given(x=arrays(), qt=st.sampled_from(QTYPES))
def test_codes_are_nearest_levels(x, qt):
    """Every code is a nearest level of s = x/c (within float32 rounding of s)."""
    packed, _ = quantize_4bit(x, 64, qt)
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    codes = codes[: x.size]
    code = cb.get_codebook(qt).astype(np.float64)
    c = np.repeat(np.maximum(_block_absmax_ref(x, 64), 1e-38), 64)[: x.size]
    s = x.astype(np.float64) / c
    chosen = np.abs(s - code[codes])
    best = np.abs(s[:, None] - code[None, :]).min(axis=1)
    assert np.all(chosen <= best + 1e-6)


def test_packing_layout_by_hand():
    # NF4: 1.0 ↦ code 15, −1.0 ↦ code 0, 0 ↦ code 7; first element in the high nibble
    x = np.array([1.0, -1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    packed, state = quantize_4bit(x, 32, "nf4")
    np.testing.assert_array_equal(packed, [0xF0, 0x7F, 0x77])  # odd count: padded with 7
    np.testing.assert_array_equal(state.absmax, [1.0])
    # FP4: 1.0 ↦ 0b0011, −1.0 ↦ 0b1011, zero ↦ 0b0000
    packed, _ = quantize_4bit(x, 32, "fp4")
    np.testing.assert_array_equal(packed, [0x3B, 0x03, 0x00])


def test_ties_go_to_the_lower_level():
    order, mids = cb.decision_boundaries(cb.nf4_codebook())
    for k in (0, 6, 7, 14):
        m = mids[k]
        up = np.nextafter(m, np.float32(2))
        x = np.zeros(64, dtype=np.float32)
        x[0], x[1], x[2] = 1.0, m, up  # c = 1, so s = x exactly
        packed, _ = quantize_4bit(x, 64, "nf4")
        assert packed[0] & 15 == order[k]  # s on the midpoint: lower level
        assert packed[1] >> 4 == order[k + 1]  # one ulp above: upper level


def test_fp4_small_values_sign_rule():
    # bitsandbytes' stable sort puts code 0 before code 8 (both zero): tiny negatives and
    # zero get code 0, tiny positives code 8.
    x = np.zeros(64, dtype=np.float32)
    x[:4] = [1.0, 1e-4, -1e-4, 0.0]
    packed, _ = quantize_4bit(x, 64, "fp4")
    np.testing.assert_array_equal(packed[:2], [0x38, 0x00])


def test_zero_blocks_no_nan():
    x = np.zeros(64 * 2 + 10, dtype=np.float32)
    x[64:128] = np.linspace(-1, 1, 64)
    packed, state = quantize_4bit(x, 64, "nf4")
    assert state.absmax[0] == 0.0  # a full zero block stores 0
    assert state.absmax[2] == np.float32(1e-38)  # a short zero block stores the clamp
    xhat = dequantize_4bit(packed, state)
    assert np.all(np.isfinite(xhat)) and np.all(xhat[:64] == 0) and np.all(xhat[128:] == 0)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dtypes_and_shapes(dtype):
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(dtype)
    packed, state = quantize_4bit(x, 32, "nf4")
    xhat = dequantize_4bit(packed, state)
    assert xhat.shape == (3, 5, 7) and xhat.dtype == np.dtype(dtype)
    assert state.dtype == dtype and state.shape == (3, 5, 7)
    # computed in float32: the result does not depend on the input precision beyond that
    p32, _ = quantize_4bit(x.astype(np.float32), 32, "nf4")
    np.testing.assert_array_equal(packed, p32)


def test_noncontiguous_input():
    x = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)
    p1, s1 = quantize_4bit(x.T, 64, "nf4")
    p2, _ = quantize_4bit(np.ascontiguousarray(x.T), 64, "nf4")
    np.testing.assert_array_equal(p1, p2)
    assert s1.shape == (30, 40)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"blocksize": True}, ValueError, "blocksize"),
        ({"quant_type": "nf5"}, ValueError, "quant_type"),
        ({"impl": "tpu"}, ValueError, "impl"),
        ({"double_quant": "yes"}, TypeError, "double_quant"),
    ],
)
def test_argument_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_4bit(np.ones(64, np.float32), **kwargs)


def test_input_validation():
    with pytest.raises(TypeError, match="x: expected dtype"):
        quantize_4bit(np.ones(64, np.int32))
    with pytest.raises(TypeError, match="x: expected an array"):
        quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        quantize_4bit(np.ones(0, np.float32))
    x = np.ones(100, np.float32)
    x[70] = np.nan
    with pytest.raises(ValueError, match=r"finite.*index 70"):
        quantize_4bit(x)
    x[70] = np.inf
    with pytest.raises(ValueError, match="finite"):
        quantize_4bit(x, impl="numba")
    packed, state = quantize_4bit(np.ones(100, np.float32))
    with pytest.raises(ValueError, match="packed"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(TypeError, match="state"):
        dequantize_4bit(packed, {"absmax": 1})


@pytest.mark.parametrize("nested", [False, True])
def test_save_load_roundtrip(tmp_path, nested):
    x = np.random.default_rng(2).standard_normal((70, 33)).astype(np.float16)
    packed, state = quantize_4bit(x, 64, "fp4", double_quant=nested)
    path = tmp_path / "w.safetensors"
    save_4bit(path, packed, state)
    p2, s2 = load_4bit(path)
    np.testing.assert_array_equal(p2, packed)
    assert s2.nested == nested and s2.shape == state.shape and s2.dtype == "float16"
    np.testing.assert_array_equal(dequantize_4bit(p2, s2), dequantize_4bit(packed, state))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ValueError, match="quant_state"):
        load_4bit(path)


def test_state_validation():
    _, state = quantize_4bit(np.ones(200, np.float32), 64)
    bad = QuantState(state.absmax[:-1], state.shape, state.dtype, 64, "nf4", state.code)
    with pytest.raises(ValueError, match="absmax"):
        bad.validate()


# ---------------------------------------------------------------- double quantization


def test_double_quant_is_exact_nearest_and_bounded():
    rng = np.random.default_rng(3)
    c = np.abs(rng.standard_normal(256 * 20 + 77)).astype(np.float32) * 0.05
    q, s2 = double_quantize(c)
    assert q.dtype == np.uint8 and s2.absmax.shape == (-(-c.size // 256),)
    mu = np.float32(np.mean(c.astype(np.float64)))
    assert s2.offset == mu
    centred = c - mu
    a2 = np.repeat(np.maximum(s2.absmax, np.float32(1e-38)), 256)[: c.size]
    s = (centred / a2).astype(np.float64)
    code = cb.dynamic_map_signed().astype(np.float64)
    d = np.abs(s[:, None] - code[None, :])
    brute = np.argmin(d, axis=1)  # first minimum: the lower code on a tie (code is sorted)
    np.testing.assert_array_equal(q, brute)
    chat = double_dequantize(q, s2)
    gap = np.max(np.diff(code)) / 2
    assert np.all(np.abs(chat.astype(np.float64) - c) <= a2 * gap * (1 + 1e-6) + 1e-7)


def test_double_quant_in_quantize_4bit():
    x = np.random.default_rng(4).standard_normal(64 * 300).astype(np.float32)
    p0, s0 = quantize_4bit(x, 64, "nf4")
    p1, s1 = quantize_4bit(x, 64, "nf4", double_quant=True)
    np.testing.assert_array_equal(p0, p1)  # the 4-bit codes do not depend on it
    assert s1.absmax.dtype == np.uint8 and s1.nested
    rel = np.abs(s1.block_scales() - s0.absmax) / s0.absmax
    assert rel.max() < 0.02  # one dynamic-map step near 1 is ≤ 1.4 % of absmax₂


def test_bits_per_parameter_closed_forms():
    assert bits_per_parameter(64) == 4 + 32 / 64 == 4.5
    assert bits_per_parameter(64, True) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    # measured from an actual state: bytes of codes + constants, n a multiple of 64·256
    n = 64 * 256 * 2
    packed, st_ = quantize_4bit(
        np.random.default_rng(5).standard_normal(n).astype(np.float32), 64, double_quant=True
    )
    nbytes = packed.nbytes + st_.absmax.nbytes + st_.state2.absmax.nbytes + 4  # + μ
    assert nbytes * 8 / n == bits_per_parameter(64, True, n_params=n)


def test_memory_table_65b():
    """ERRATA 4: the lecture's 65B table, recomputed from the formulas."""
    t = memory_table(65e9)
    assert t["n_blocks"] == 65e9 / 64 == 1_015_625_000
    assert t["weights"] == 32.5e9
    assert t["constants_fp32"] == 4.0625e9  # lecture: 4.08 GB
    # QLoRA: 1 byte per block + 4 bytes per 256 blocks + μ
    assert t["constants_dq"] == 1_015_625_000 + 4 * np.ceil(1_015_625_000 / 256) + 4
    np.testing.assert_allclose(t["saving_constants"], 1 - 1.03149e9 / 4.0625e9, rtol=1e-5)
    np.testing.assert_allclose(t["bits_dq"], 4.126953125, rtol=1e-9)
    assert t["constants_lecture"] == 1_015_625_000 + 4


def test_lecture_double_quant_error_is_1e_minus_6():
    """ERRATA 4: ε₂ = 1/(12·255²) ≈ 1.28·10⁻⁶ (not 1.3·10⁻⁵) for c/c_max uniform on [0, 1]."""
    c = np.random.default_rng(6).uniform(0, 1, 400_000).astype(np.float32)
    c[0] = 1.0
    q, cmax = lecture_double_quantize(c)
    mse = np.mean((lecture_double_dequantize(q, cmax).astype(np.float64) - c) ** 2)
    np.testing.assert_allclose(mse, 1 / (12 * 255**2), rtol=0.02)
    assert 1.2e-6 < mse < 1.35e-6
    with pytest.raises(ValueError, match="non-negative"):  # the lecture's example: randn
        lecture_double_quantize(np.array([0.5, -0.2], np.float32))


# ------------------------------------------------------------------------------ kernels

KERNEL_CASES = [  # (n, blocksize, quant_type)
    (1, 32, "nf4"),
    (2, 64, "fp4"),
    (63, 64, "nf4"),
    (64, 64, "int4"),
    (65, 32, "fp4"),
    (1000, 128, "nf4"),
    (4097, 4096, "fp4"),
    (64 * 37 + 5, 64, "int4"),
]


def _kernel_input(n, seed=0):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[: min(n, 40)] = 0.0  # a zero run (a zero block for blocksize 32)
    if n > 8:
        x[-3:] = 0.0
    return x


@pytest.mark.parametrize(("n", "bs", "qt"), KERNEL_CASES)
def test_numba_equals_numpy(n, bs, qt):
    x = _kernel_input(n)
    p_ref, s_ref = quantize_4bit(x, bs, qt)
    p_nb, s_nb = quantize_4bit(x, bs, qt, impl="numba")
    np.testing.assert_array_equal(p_nb, p_ref)
    np.testing.assert_array_equal(s_nb.absmax, s_ref.absmax)
    d_ref = dequantize_4bit(p_ref, s_ref)
    d_nb = dequantize_4bit(p_ref, s_ref, impl="numba")
    assert d_nb.tobytes() == d_ref.tobytes()  # bit for bit (signed zeros included)


@given(x=arrays(), qt=st.sampled_from(QTYPES), bs=st.sampled_from([32, 64, 256]))
def test_numba_equals_numpy_property(x, qt, bs):
    p_ref, s_ref = quantize_4bit(x, bs, qt)
    p_nb, s_nb = quantize_4bit(x, bs, qt, impl="numba")
    assert p_nb.tobytes() == p_ref.tobytes() and s_nb.absmax.tobytes() == s_ref.absmax.tobytes()
    assert dequantize_4bit(p_ref, s_ref, impl="numba").tobytes() == (
        dequantize_4bit(p_ref, s_ref).tobytes()
    )


def test_numba_disabled_jit_subprocess():
    code = textwrap.dedent(
        """
        import numpy as np, numba
        assert numba.config.DISABLE_JIT
        from minipeft.quant.blockwise import quantize_4bit, dequantize_4bit
        x = np.random.default_rng(0).standard_normal(201).astype(np.float32)
        x[:32] = 0
        for qt in ("nf4", "fp4"):
            p, s = quantize_4bit(x, 32, qt)
            p2, s2 = quantize_4bit(x, 32, qt, impl="numba")
            assert np.array_equal(p, p2) and np.array_equal(s.absmax, s2.absmax)
            d = dequantize_4bit(p, s, impl="numba")
            assert d.tobytes() == dequantize_4bit(p, s).tobytes()
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
@pytest.mark.parametrize(("n", "bs", "qt"), KERNEL_CASES)
def test_cuda_equals_numpy(n, bs, qt):  # pragma: no cover - needs a GPU
    import cupy

    x = _kernel_input(n)
    p_ref, s_ref = quantize_4bit(x, bs, qt)
    p_cu, s_cu = quantize_4bit(cupy.asarray(x), bs, qt, impl="cuda")
    np.testing.assert_array_equal(cupy.asnumpy(p_cu), p_ref)
    np.testing.assert_array_equal(s_cu.absmax, s_ref.absmax)
    d_cu = cupy.asnumpy(dequantize_4bit(cupy.asarray(p_ref), s_ref, impl="cuda"))
    assert d_cu.tobytes() == dequantize_4bit(p_ref, s_ref).tobytes()


def test_valid_blocksizes_match_bitsandbytes_list():
    assert VALID_BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)


def test_dequantize_into_a_reused_buffer_is_bit_identical():
    x = np.random.default_rng(5).standard_normal((37, 64)).astype(np.float32)
    packed, state = quantize_4bit(x, 64, "nf4")
    buf = np.empty((37, 64), dtype=np.float32)
    got = dequantize_4bit(packed, state, out=buf)
    assert got is buf
    assert buf.tobytes() == dequantize_4bit(packed, state, impl="reference").tobytes()
    with pytest.raises(ValueError, match="out"):
        dequantize_4bit(packed, state, out=np.empty((64, 37), dtype=np.float32))
    with pytest.raises(ValueError, match="out"):
        dequantize_4bit(packed, state, impl="reference", out=buf)
