"""Codebooks built from their definitions, against published tables and bitsandbytes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from minipeft.quant import codebooks as cb

# QLoRA paper, Appendix E, written out independently of NF4_PUBLISHED in the module.
PAPER_NF4_DECIMALS = [
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
]  # fmt: skip


def test_nf4_equals_published_table_bit_for_bit():
    np.testing.assert_array_equal(cb.nf4_codebook(), cb.NF4_PUBLISHED)
    np.testing.assert_allclose(cb.nf4_codebook(), PAPER_NF4_DECIMALS, atol=5e-5)


def test_nf4_structure():
    code = cb.nf4_codebook().astype(np.float64)
    assert code.shape == (16,) and np.all(np.diff(code) > 0)
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7  # 8 positive levels, 7 negative


def test_nf4_levels_are_normal_quantiles_in_exact_arithmetic():
    # Independent reconstruction in float64: quantiles at evenly spaced probabilities.
    off = (1 - 1 / 30 + 1 - 1 / 32) / 2  # ½(1 − 1/(2·15) + 1 − 1/(2·16))
    assert abs(off - cb.NF4_OFFSET) < 1e-7
    pos = norm.ppf(np.linspace(cb.NF4_OFFSET, 0.5, 9)[:-1]) / norm.ppf(cb.NF4_OFFSET)
    neg = -norm.ppf(np.linspace(cb.NF4_OFFSET, 0.5, 8)[:-1]) / norm.ppf(cb.NF4_OFFSET)
    expected = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(cb.nf4_codebook(), expected, rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(cb.create_normal_map(exact=True), expected, rtol=0, atol=6e-8)


def test_fp4_matches_bit_layout():
    code = cb.fp4_codebook().astype(np.float64)
    # sign bit 3; magnitudes of 0b000..0b111 are 0, 1/16, 8, 12, 4, 6, 2, 3 (÷ 12)
    mags = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12).astype(np.float32)
    np.testing.assert_array_equal(code[:8], mags)
    np.testing.assert_array_equal(code[8:], -mags)
    assert np.abs(code).max() == 1.0


def test_int4_symmetric():
    code = cb.int4_codebook().astype(np.float64)
    np.testing.assert_array_equal(code[:8], (np.arange(8) / 7).astype(np.float32))
    np.testing.assert_array_equal(code[8:], -code[:8])
    assert cb.sorted_levels(code).size == 15


def test_lecture_variant_is_not_nf4():
    """ERRATA 1: the lecture lists 15 values for a 16-code type, and its procedure differs."""
    assert cb.LECTURE_NF4_LISTED.size == 15
    nf4 = cb.nf4_codebook().astype(np.float64)
    # its negative half is NF4's negative half (to 4 decimals) ...
    np.testing.assert_allclose(cb.LECTURE_NF4_LISTED[:8], nf4[:8], atol=5e-5)
    # ... its positive half is that mirrored, which NF4's is not
    assert np.abs(cb.LECTURE_NF4_LISTED[8:] - nf4[9:]).max() > 0.02
    lec = cb.lecture_quantile_codebook()
    assert lec.size == 16 and not np.all(np.diff(lec) > 0)  # the procedure is not monotone
    assert not np.any(lec == 0.0)  # and has no exact zero
    np.testing.assert_allclose(lec[1], -1.0)
    np.testing.assert_allclose(abs(lec[0]), 1 / abs(norm.ppf(1 / 15)), rtol=1e-12)


def test_dynamic_map_structure():
    code = cb.dynamic_map_signed().astype(np.float64)
    assert code.shape == (256,) and np.all(np.diff(code) > 0)
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    # smallest magnitude: first exponent (10⁻⁶), one cell [0.1, 1], midpoint 0.55
    np.testing.assert_allclose(np.abs(code[code != 0]).min(), 1e-6 * 0.55, rtol=1e-6)
    # largest negative: 1.0 · midpoint of the last 64-cell grid's top cell
    np.testing.assert_allclose(code[0], -(1 - 0.9 / 128), rtol=1e-6)


def test_decision_boundaries_nearest_ties_low():
    order, mids = cb.decision_boundaries(cb.fp4_codebook())
    srt = cb.fp4_codebook()[order]
    assert np.all(np.diff(srt.astype(np.float64)) >= 0)
    assert list(order[7:9]) == [0, 8]  # stable: +0 (code 0) before the sign-bit zero (code 8)
    np.testing.assert_allclose(mids, (srt[:-1].astype(np.float64) + srt[1:]) / 2, rtol=1e-7)


@pytest.mark.parametrize("bad", [0.5, 1.0, 0.2])
def test_normal_map_rejects_bad_offset(bad):
    with pytest.raises(ValueError, match="offset"):
        cb.create_normal_map(bad)


def test_get_codebook_rejects_unknown():
    with pytest.raises(ValueError, match="quant_type"):
        cb.get_codebook("nf5")


def test_codebooks_are_read_only():
    with pytest.raises(ValueError):
        cb.nf4_codebook()[0] = 0.5


# ---------------------------------------------------------------- bitsandbytes (optional)


@pytest.fixture(scope="module")
def bnbF():
    pytest.importorskip("torch", reason="bitsandbytes cross-check needs torch")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    import bitsandbytes.functional as F

    return F


def test_nf4_equals_bitsandbytes(bnbF):
    np.testing.assert_array_equal(cb.nf4_codebook(), bnbF.get_4bit_type("nf4", "cpu").numpy())


@pytest.mark.parametrize("offset", [cb.NF4_OFFSET, 0.99, 0.95])
@pytest.mark.parametrize("extra", [True, False])
def test_create_normal_map_equals_bitsandbytes(bnbF, offset, extra):
    ours = cb.create_normal_map(offset, extra)
    theirs = np.unique(bnbF.create_normal_map(offset, extra).numpy())  # 256 padded with zeros
    np.testing.assert_array_equal(ours, theirs)


def test_fp4_equals_bitsandbytes(bnbF):
    theirs = bnbF.get_4bit_type("fp4", "cpu").numpy()
    np.testing.assert_array_equal(cb.fp4_codebook(), theirs)
    np.testing.assert_array_equal(np.signbit(cb.fp4_codebook()), np.signbit(theirs))


@pytest.mark.parametrize(("signed", "max_exp"), [(True, 5), (True, 6), (True, 7), (False, 7)])
def test_dynamic_map_equals_bitsandbytes(bnbF, signed, max_exp):
    ours = cb.create_dynamic_map(signed, max_exp)
    np.testing.assert_array_equal(ours, bnbF.create_dynamic_map(signed, max_exp).numpy())
