"""Lloyd-Max quantization: exact Gaussian solution, sample (k-means) version, the limits.

References are quadrature (scipy.integrate.quad), scipy.stats.truncnorm, Max's published
tables (1960) and closed forms — never a value the code under test produced.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, special, stats

from minipeft.quant.lloyd_max import (
    code_entropy,
    gaussian_bin_probabilities,
    gaussian_quantizer_mse,
    lloyd_max_gaussian,
    lloyd_max_samples,
    lloyd_max_step,
    midpoint_thresholds,
    optimal_uniform_gaussian,
    panter_dite_gaussian,
    quantize_to_levels,
    rate_distortion_gaussian,
    truncated_gaussian_mean,
)
from minipeft.verify.checks.quantization import MAX_1960_TABLE_I, MAX_1960_TABLE_II


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _quad_mse(levels, thresholds) -> float:
    edges = np.concatenate([[-np.inf], thresholds, [np.inf]])
    return sum(
        integrate.quad(lambda x, q=q: (x - q) ** 2 * _phi(x), lo, hi, epsabs=1e-14)[0]
        for q, lo, hi in zip(levels, edges[:-1], edges[1:])
    )


# ------------------------------------------------------------------ the exact N(0,1) solution
@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 12, 16, 23, 32])
def test_solution_is_ordered_symmetric_and_a_fixed_point(n):
    levels, thr, mse = lloyd_max_gaussian(n)
    assert levels.shape == (n,) and thr.shape == (n - 1,)
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_array_equal(levels, -levels[::-1])  # odd symmetry, exact
    np.testing.assert_allclose(thr, 0.5 * (levels[:-1] + levels[1:]), rtol=0, atol=1e-15)
    new, _ = lloyd_max_step(levels)
    np.testing.assert_allclose(new, levels, rtol=0, atol=1e-11)  # centroid condition
    np.testing.assert_allclose(mse, _quad_mse(levels, thr), rtol=1e-9)


@pytest.mark.parametrize("n", [4, 16])
def test_solution_is_a_stationary_point_of_the_exact_mse(n):
    levels, thr, mse = lloyd_max_gaussian(n)
    h = 1e-6
    for i in range(n):  # ∂D/∂y_i = 0 (centroid condition), by central differences
        up, dn = levels.copy(), levels.copy()
        up[i] += h
        dn[i] -= h
        g = (gaussian_quantizer_mse(up, thr) - gaussian_quantizer_mse(dn, thr)) / (2 * h)
        assert abs(g) < 1e-8
    for i in range(n - 1):  # ∂D/∂t_i = 0 (midpoint condition)
        up, dn = thr.copy(), thr.copy()
        up[i] += h
        dn[i] -= h
        g = (gaussian_quantizer_mse(levels, up) - gaussian_quantizer_mse(levels, dn)) / (2 * h)
        assert abs(g) < 1e-8
    # and a minimum: random perturbations of the levels never lower the MSE
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert gaussian_quantizer_mse(levels + 1e-3 * rng.standard_normal(n)) > mse


@pytest.mark.parametrize("n", sorted(MAX_1960_TABLE_I))
def test_reproduces_max_1960_table_I(n):
    row = MAX_1960_TABLE_I[n]
    levels, thr, mse = lloyd_max_gaussian(n)
    # printed with 4 significant digits; Max's 16-level column is off by up to 4e-4 relative
    np.testing.assert_allclose(levels[n // 2 :], row["y"], rtol=5e-4)
    if row["x"]:
        np.testing.assert_allclose(thr[n // 2 :], row["x"], rtol=5e-4)
    np.testing.assert_allclose(mse, row["mse"], rtol=5e-4)


def test_max_1960_values_for_2_and_4_levels_have_closed_forms():
    # two levels: ±E|X| = ±√(2/π), MSE = 1 − 2/π
    levels, thr, mse = lloyd_max_gaussian(2)
    np.testing.assert_allclose(levels, [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], 1e-14)
    np.testing.assert_allclose(mse, 1 - 2 / math.pi, rtol=1e-13)
    np.testing.assert_array_equal(thr, [0.0])


@pytest.mark.parametrize("n", sorted(MAX_1960_TABLE_II))
def test_optimal_uniform_reproduces_max_1960_table_II(n):
    step, mse = MAX_1960_TABLE_II[n]
    u = optimal_uniform_gaussian(n)
    np.testing.assert_allclose(u.step, step, rtol=5e-4)
    np.testing.assert_allclose(u.mse, mse, rtol=5e-4)
    np.testing.assert_allclose(np.diff(u.levels), u.step, rtol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16, 32])
def test_ordering_of_bounds(n):
    """D(R) < Lloyd-Max ≤ best uniform, with equality for n ≤ 3 (one free parameter)."""
    R = math.log2(n)
    d_rd = float(rate_distortion_gaussian(R))
    d_lm = lloyd_max_gaussian(n).mse
    d_u = optimal_uniform_gaussian(n).mse
    assert d_rd < d_lm
    if n <= 3:
        np.testing.assert_allclose(d_u, d_lm, rtol=1e-9)
    else:
        assert d_lm < d_u


def test_mse_falls_with_levels_and_approaches_panter_dite():
    ns = [16, 32, 64, 128, 256]
    d = np.array([lloyd_max_gaussian(n).mse for n in ns])
    assert np.all(np.diff(d) < 0)
    c = np.array(ns) ** 2 * d  # N²·D(N) rises towards √3π/2
    assert np.all(np.diff(c) > 0)
    limit = math.sqrt(3) * math.pi / 2
    assert c[-1] < limit and (limit - c[-1]) / limit < 0.01
    np.testing.assert_allclose(panter_dite_gaussian(8.0), limit / 2**16, rtol=1e-15)


def test_lloyd_max_is_not_the_quantile_quantizer():
    """ERRATA 2: equal-probability bins maximize entropy; Lloyd-Max minimizes MSE."""
    n = 16
    q_edges = special.ndtri(np.arange(n + 1) / n)  # Φ⁻¹(k/16)
    q_levels = np.array(
        [integrate.quad(lambda x: x * _phi(x), a, b)[0] * n for a, b in itertools.pairwise(q_edges)]
    )  # centroid of each equal-probability bin (P = 1/16)
    q_mse = _quad_mse(q_levels, q_edges[1:-1])
    levels, thr, mse = lloyd_max_gaussian(n)
    assert mse < q_mse  # Lloyd-Max has lower MSE
    h_quantile = code_entropy(gaussian_bin_probabilities(q_edges[1:-1]))
    h_lm = code_entropy(gaussian_bin_probabilities(thr))
    np.testing.assert_allclose(h_quantile, 4.0, rtol=1e-12)  # maximal entropy
    assert h_lm < h_quantile
    assert np.max(np.abs(levels - q_levels)) > 0.05


def test_rate_distortion_values():
    np.testing.assert_allclose(rate_distortion_gaussian(4.0), 2.0**-8, rtol=1e-15)
    np.testing.assert_allclose(rate_distortion_gaussian([0, 1], variance=3.0), [3.0, 0.75])
    with pytest.raises(ValueError, match="rate_bits"):
        rate_distortion_gaussian(-1.0)
    with pytest.raises(ValueError, match="variance"):
        rate_distortion_gaussian(1.0, variance=0.0)


# ----------------------------------------------------------------------- Gaussian integrals
@given(
    a=st.floats(-6, 6),
    width=st.floats(1e-3, 5),
)
def test_truncated_mean_matches_scipy_truncnorm(a, width):
    b = a + width
    ref = stats.truncnorm(a, b).mean()
    np.testing.assert_allclose(truncated_gaussian_mean(a, b), ref, rtol=1e-9, atol=1e-12)


def test_truncated_mean_in_the_far_tails_and_at_infinity():
    a = np.array([-np.inf, 8.0, 30.0, -np.inf])
    b = np.array([-30.0, np.inf, np.inf, np.inf])
    m = truncated_gaussian_mean(a, b)
    mills = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) / special.ndtr(-t)  # noqa: E731
    np.testing.assert_allclose(m[:3], [-mills(30.0), mills(8.0), mills(30.0)], rtol=1e-12)
    assert m[3] == 0.0


def test_truncated_mean_rejects_empty_or_nan_intervals():
    with pytest.raises(ValueError, match="a < b"):
        truncated_gaussian_mean(1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        truncated_gaussian_mean(np.nan, 1.0)


@given(st.lists(st.floats(-4, 4), min_size=2, max_size=8, unique=True))
def test_exact_mse_matches_quadrature(values):
    levels = np.sort(np.array(values))
    if np.min(np.diff(levels)) < 1e-3:
        levels = levels + 1e-3 * np.arange(levels.size)
    thr = midpoint_thresholds(levels)
    np.testing.assert_allclose(gaussian_quantizer_mse(levels), _quad_mse(levels, thr), rtol=1e-8)


def test_bin_probabilities_sum_to_one_and_match_cdf():
    thr = np.array([-1.0, 0.0, 2.5])
    p = gaussian_bin_probabilities(thr)
    ref = np.diff(stats.norm.cdf(np.concatenate([[-np.inf], thr, [np.inf]])))
    np.testing.assert_allclose(p, ref, rtol=1e-13)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-15)


def test_code_entropy_against_scipy_and_bad_input():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    np.testing.assert_allclose(code_entropy(p), stats.entropy(p, base=2), rtol=1e-14)
    np.testing.assert_allclose(code_entropy(p), 1.75, rtol=1e-15)
    with pytest.raises(ValueError, match="sum"):
        code_entropy([0.5, 0.4])
    with pytest.raises(ValueError, match="non-negative"):
        code_entropy([1.5, -0.5])


@pytest.mark.parametrize(
    "n, exc, match",
    [
        (1, ValueError, "≥ 2"),
        (0, ValueError, "≥ 2"),
        (4.0, TypeError, "int"),
        (True, TypeError, "int"),
    ],
)
def test_bad_n_levels(n, exc, match):
    with pytest.raises(exc, match=match):
        lloyd_max_gaussian(n)
    with pytest.raises(exc, match=match):
        lloyd_max_samples(np.arange(10.0), n)


def test_bad_tolerance():
    with pytest.raises(ValueError, match="tol"):
        lloyd_max_gaussian(4, tol=1e-17)
    with pytest.raises(ValueError, match="tol"):
        lloyd_max_gaussian(4, tol=-1.0)


def test_bad_levels():
    with pytest.raises(ValueError, match="increasing"):
        gaussian_quantizer_mse([1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        gaussian_quantizer_mse([0.0, np.inf])
    with pytest.raises(ValueError, match="thresholds"):
        gaussian_quantizer_mse([0.0, 1.0, 2.0], [0.5])


# ------------------------------------------------------------- sample Lloyd-Max (1-D k-means)
def test_samples_two_clusters_hand_computed():
    x = np.array([0.0, 0.0, 1.0, 1.0, 10.0, 10.0, 11.0, 11.0])
    levels, thr, mse = lloyd_max_samples(x, 2)
    np.testing.assert_allclose(levels, [0.5, 10.5])
    np.testing.assert_allclose(thr, [5.5])
    np.testing.assert_allclose(mse, 0.25)


def test_samples_approach_the_gaussian_optimum():
    x = np.random.default_rng(1).standard_normal(200_000)
    levels, _, mse = lloyd_max_samples(x, 4)
    np.testing.assert_allclose(levels[2:], MAX_1960_TABLE_I[4]["y"], atol=0.02)
    np.testing.assert_allclose(mse, MAX_1960_TABLE_I[4]["mse"], rtol=0.03)


@given(
    st.lists(st.floats(-100, 100), min_size=8, max_size=200),
    st.integers(2, 6),
)
def test_samples_satisfy_both_conditions_on_the_data(values, n):
    x = np.array(values)
    if np.unique(x).size < n:
        with pytest.raises(ValueError, match="distinct"):
            lloyd_max_samples(x, n)
        return
    levels, thr, mse = lloyd_max_samples(x, n)
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(thr, 0.5 * (levels[:-1] + levels[1:]))
    idx = quantize_to_levels(x, levels)
    np.testing.assert_allclose(mse, np.mean((x - levels[idx]) ** 2), rtol=1e-12, atol=1e-12)
    for i in range(n):  # every non-empty bin: its level is the mean of its samples
        members = x[idx == i]
        if members.size:
            np.testing.assert_allclose(levels[i], members.mean(), rtol=1e-9, atol=1e-9)


def test_samples_never_worse_than_the_equal_count_start():
    x = np.random.default_rng(2).standard_t(3, 5000)
    s = np.sort(x)
    cuts = np.round(np.linspace(0, s.size, 9)).astype(int)
    start = np.array([s[a:b].mean() for a, b in itertools.pairwise(cuts)])
    start_mse = np.mean((x - start[quantize_to_levels(x, start)]) ** 2)
    assert lloyd_max_samples(x, 8).mse <= start_mse


@pytest.mark.parametrize(
    "x, match",
    [
        (np.array([0.0, np.nan, 1.0]), "finite"),
        (np.array([0.0, np.inf, 1.0]), "finite"),
        (np.array([]), "empty"),
        (np.array([1.0, 1.0, 1.0]), "distinct"),
    ],
)
def test_samples_bad_data(x, match):
    with pytest.raises(ValueError, match=match):
        lloyd_max_samples(x, 2)


def test_samples_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        lloyd_max_samples(np.array(["a", "b", "c"]), 2)
