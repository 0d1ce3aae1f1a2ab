"""Codebooks (quantization maps) for 4-bit and 8-bit blockwise quantization.

A codebook is the table ``code[c]`` that turns a code ``c`` back into a value in
[-1, 1]; blockwise quantization stores ``c`` and a per-block scale (``absmax``), and
dequantizes ``x̂ = code[c] · absmax``. Every table here is built from its definition and
shown equal, bit for bit, to the one bitsandbytes uses (``tests/test_codebooks.py``):

* :func:`nf4_codebook` — NormalFloat4 (QLoRA, Dettmers et al. 2023, §3 and Appendix E):
  8 non-negative levels from normal quantiles of one half, 7 negative levels from the
  other half, an exact zero, normalized to [-1, 1]. Registered check ``qlora.nf4_codebook``
  compares it with the table published in the paper's appendix.
* :func:`fp4_codebook` — bitsandbytes' FP4 (sign bit + 3 bits: 2 exponent, 1 mantissa),
  indexed by bit pattern, not sorted. Check ``qlora.fp4_codebook``.
* :func:`int4_codebook` — symmetric sign-magnitude int4, ±m/7.
* :func:`create_dynamic_map` — the signed 8-bit "dynamic" map (Dettmers 2015) that double
  quantization uses for the absmax constants.
* :func:`lecture_quantile_codebook` and :data:`LECTURE_NF4_LISTED` — the lecture's
  symmetric Φ⁻¹(i/15) variant, kept only as a labelled comparison (ERRATA 1).

All tables are float32 arrays, read-only (they are cached; copy before changing one).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.stats import norm

__all__ = [
    "CODEBOOK_NAMES",
    "LECTURE_NF4_LISTED",
    "NF4_OFFSET",
    "NF4_PUBLISHED",
    "create_dynamic_map",
    "create_normal_map",
    "decision_boundaries",
    "dynamic_map_signed",
    "float32_linspace",
    "fp4_codebook",
    "get_codebook",
    "int4_codebook",
    "lecture_quantile_codebook",
    "nearest_code",
    "nf4_codebook",
    "sorted_levels",
]

# NF4 offset: the outermost probability, the mean of 1 − 1/(2·15) and 1 − 1/(2·16), so that
# the extreme quantile stays finite for both halves (QLoRA §3; bitsandbytes uses 0.9677083).
# 1 − ½(1/30 + 1/32) = 0.96770833…
NF4_OFFSET = 0.9677083

# The NF4 table as printed in the QLoRA paper, Appendix E ("NormalFloat 4-bit data type",
# arXiv:2305.14314). An independent reference: transcribed from the paper, not computed here.
NF4_PUBLISHED = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_PUBLISHED.flags.writeable = False

# The 15 values the lecture lists as "NF4" (§3.2.2, Step 3): its negative half is the true
# NF4 negative half (to 4 decimals); its positive half is that mirrored, which NF4 is not.
_LECTURE_NEG = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0]
_LECTURE_POS = [0.0911, 0.1848, 0.2844, 0.3949, 0.5251, 0.6962, 1.0]
LECTURE_NF4_LISTED = np.array([*_LECTURE_NEG, *_LECTURE_POS], dtype=np.float64)
LECTURE_NF4_LISTED.flags.writeable = False

CODEBOOK_NAMES = ("nf4", "fp4", "int4")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def float32_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """Evenly spaced float32 points, rounded the way PyTorch's float32 ``linspace`` rounds.

    h = fl32((fl32(end) − fl32(start)) / (steps − 1)); the lower half is
    p_i = fl32(start + i·h) and the upper half p_i = fl32(end − (steps−1−i)·h), each
    rounded once (a fused multiply-add). bitsandbytes builds its NF4 and dynamic maps from
    these float32 probabilities, so reproducing its constants bit for bit needs them;
    ``np.linspace(...).astype(float32)`` differs in some last bits.
    """
    if not isinstance(steps, int | np.integer) or steps < 2:
        raise ValueError(f"steps: expected an integer ≥ 2, got {steps!r}")
    s = np.float32(start)
    e = np.float32(end)
    h = np.float32((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    # float64 holds s + i·h exactly (24-bit operands, small i): one rounding, as an FMA
    lower = (np.float64(s) + np.float64(h) * i).astype(np.float32)
    upper = (np.float64(e) - np.float64(h) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, lower, upper)


def create_normal_map(
    offset: float = NF4_OFFSET, use_extra_value: bool = True, *, exact: bool = False
) -> np.ndarray:
    """NormalFloat levels from normal quantiles, sorted, normalized to [-1, 1]. [qlora.nf4_codebook]

    With ``use_extra_value`` (NF4): 8 non-negative levels Φ⁻¹(p) for p evenly spaced from
    ``offset`` down to ½ (9 points, ½ dropped, zero added), 7 negative levels −Φ⁻¹(p) for p
    from ``offset`` to ½ (8 points, ½ dropped), then divide by the largest:

        q⁺_j = Φ⁻¹(offset − j·(offset − ½)/8),   j = 0..7
        q⁻_j = −Φ⁻¹(offset − j·(offset − ½)/7),  j = 0..6
        NF4  = sort({q⁺} ∪ {0} ∪ {q⁻}) / q⁺_0

    16 levels, an exact zero, asymmetric (one more positive level than negative).

    ``exact=False`` (default) follows the float32 arithmetic in which the bitsandbytes and
    paper constants were computed (float32 probabilities, float64 Φ⁻¹, levels rounded to
    float32, float32 division): the result equals them bit for bit. ``exact=True`` computes
    in float64 throughout (the mathematical definition): it differs by ≤ 1.1·10⁻⁷.
    Without ``use_extra_value`` the map is symmetric: 7 + 7 levels and zero (15 values).
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset: expected a probability in (0.5, 1), got {offset!r}")
    n_pos = 9 if use_extra_value else 8
    if exact:
        p_pos = np.linspace(offset, 0.5, n_pos)[:-1]
        p_neg = np.linspace(offset, 0.5, 8)[:-1]
    else:
        p_pos = float32_linspace(offset, 0.5, n_pos)[:-1].astype(np.float64)
        p_neg = float32_linspace(offset, 0.5, 8)[:-1].astype(np.float64)
    pos = norm.ppf(p_pos)  # q⁺ = Φ⁻¹(p), float64
    neg = -norm.ppf(p_neg)  # q⁻ = −Φ⁻¹(p)
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    if exact:
        return (levels / levels.max()).astype(np.float32)  # one rounding at the end
    levels32 = levels.astype(np.float32)
    return levels32 / levels32.max()  # float32 division, as bitsandbytes


@functools.cache
def nf4_codebook() -> np.ndarray:
    """The NF4 table (16 float32 levels, sorted, code c ↦ level c): ``create_normal_map()``."""
    return _frozen(create_normal_map())


# bitsandbytes' FP4 magnitudes for the 3 bits below the sign bit, in bit-pattern order:
# 0b000 = 0, 0b001 = 1/16 (subnormal), then exponent field E = bits 2..1, mantissa m = bit 0:
# |v| = 2^(4−E)·(1 + m/2) for E ≥ 1 — 8, 12, 4, 6, 2, 3 — and m/16 for E = 0.
def _fp4_magnitude(bits3: int) -> float:
    e, m = bits3 >> 1, bits3 & 1
    if e == 0:
        return m / 16.0  # subnormal: 0 or 1/16
    return 2.0 ** (4 - e) * (1.0 + m / 2.0)  # normal: 2^(4−E)·(1 + m/2)


@functools.cache
def fp4_codebook() -> np.ndarray:
    """bitsandbytes FP4, indexed by the 4-bit pattern (sign in bit 3). [qlora.fp4_codebook]

    code[c] = (−1)^(c>>3) · |v(c & 7)| / 12, with |v| from the 2-bit exponent / 1-bit
    mantissa rule above (largest magnitude 12 = 0b011, so the table spans [-1, 1]). Code 8
    (sign bit with zero magnitude) decodes to zero like code 0. The table is not sorted;
    quantization sorts it (stably, so code 0 precedes code 8) and searches the sorted levels (see
    :func:`decision_boundaries`). Note: ``create_fp8_map(…, total_bits=4)`` in bitsandbytes
    yields a different subnormal (1/48 instead of 1/192): the quantization kernels use
    this table, not that function.
    """
    mags = np.array([_fp4_magnitude(b) for b in range(8)], dtype=np.float32)
    table = np.concatenate([mags, -mags + np.float32(0.0)])  # code 8: −0 stored as +0
    return _frozen(table / np.float32(12.0))  # normalize by the largest magnitude, 12


@functools.cache
def int4_codebook() -> np.ndarray:
    """Symmetric sign-magnitude int4: code c ↦ (−1)^(c>>3)·(c & 7)/7 (15 distinct values).

    The "linear" 4-bit baseline of absmax quantization: round(x/absmax · 7)/7. Code 8
    (sign bit with zero magnitude) decodes to zero.
    """
    mags = np.arange(8, dtype=np.float32) / np.float32(7.0)
    return _frozen(np.concatenate([mags, -mags + np.float32(0.0)]))  # code 8 is zero


def lecture_quantile_codebook() -> np.ndarray:
    """The lecture's procedure (§3.2.2, its code cell) as written — a labelled comparison only.

    levels = [−1, Φ⁻¹(1/15), …, Φ⁻¹(14/15), 1], then divided by max|level|. Because
    |Φ⁻¹(1/15)| ≈ 1.50 > 1, the endpoints become ±0.666 and the table is not monotone; it
    has no exact zero (Φ⁻¹(7/15) ≈ −0.084, Φ⁻¹(8/15) ≈ +0.084) and does not produce the
    15 values the lecture lists (:data:`LECTURE_NF4_LISTED`). NF4 is :func:`nf4_codebook`.
    """
    q = np.empty(16, dtype=np.float64)
    q[0], q[15] = -1.0, 1.0
    q[1:15] = norm.ppf(np.arange(1, 15) / 15.0)  # q_i = Φ⁻¹(i/15)
    return q / np.abs(q).max()


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """The 8-bit dynamic quantization map (Dettmers, "8-Bit Approximations", 2015).

    A sign bit (if ``signed``), a run of zeros whose length is a decimal exponent
    10^(−(E−1)+i), an indicator bit, and the remaining bits a linear fraction: for each
    exponent i = 0..E−1 the fraction grid has 2^(i + bits − 1 − E) (+1 unsigned) cells on
    [0.1, 1] and the levels are the cell midpoints times 10^(i − E + 1). Plus 0 and 1.
    256 float32 values, sorted (signed: from −0.99297 to 1, one exact zero).

    Computed in float32 like bitsandbytes (float32 grid, float32 midpoints and products),
    so it equals ``bitsandbytes.functional.create_dynamic_map`` bit for bit.
    """
    non_sign_bits = total_bits - 1  # as bitsandbytes, also when unsigned
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[np.ndarray] = []

    def levels(n_cells: int, exponent: int) -> np.ndarray:
        edges = float32_linspace(0.1, 1.0, n_cells + 1)
        mids = (edges[:-1] + edges[1:]) / np.float32(2.0)  # cell midpoints, float32
        return np.float32(10.0 ** (-(max_exponent_bits - 1) + exponent)) * mids

    i = 0
    for i in range(max_exponent_bits):
        n_cells = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        v = levels(n_cells, i)
        data += [v, -v] if signed else [v]
    if additional_items > 0:
        v = levels(additional_items, i)
        data += [v, -v] if signed else [v]
    values = np.concatenate([*data, np.array([0.0, 1.0], dtype=np.float32)])
    if values.size > 2**total_bits:
        raise ValueError(
            f"max_exponent_bits: {max_exponent_bits} with total_bits={total_bits} gives "
            f"{values.size} levels, more than 2^{total_bits}"
        )
    values = np.concatenate([values, np.zeros(2**total_bits - values.size, np.float32)])
    return np.sort(values).astype(np.float32)


@functools.cache
def dynamic_map_signed() -> np.ndarray:
    """The signed 8-bit dynamic map (256 float32), used by double quantization."""
    return _frozen(create_dynamic_map(signed=True))


def get_codebook(name: str) -> np.ndarray:
    """The 4-bit codebook called ``name``: 'nf4', 'fp4' or 'int4'."""
    tables = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}
    if name not in tables:
        raise ValueError(f"quant_type: expected one of {CODEBOOK_NAMES}, got {name!r}")
    return tables[name]()


def sorted_levels(code: np.ndarray) -> np.ndarray:
    """The distinct values of a codebook, sorted (±0 counted once), float64."""
    return np.unique(np.asarray(code, dtype=np.float64) + 0.0)


def decision_boundaries(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, midpoints) for nearest-level search in a codebook that need not be sorted.

    order = stable argsort of the code (position k of the sorted levels ↦ code order[k]);
    midpoints m_k = fl32((code[order[k]] + code[order[k+1]]) / 2), float32. A scaled value
    s gets the bucket k = #{m : m < s} and the code order[k]: the nearest level, a value
    exactly on a midpoint going to the lower level. This is bitsandbytes' CPU rule
    (``torch.bucketize`` on float32 midpoints).
    """
    code = np.asarray(code, dtype=np.float32)
    if code.ndim != 1 or code.size < 2:
        raise ValueError(f"code: expected a 1-D table of ≥ 2 levels, got shape {code.shape}")
    order = np.argsort(code, kind="stable")
    srt = code[order]
    mids = (srt[:-1] + srt[1:]) / np.float32(2.0)  # float32 midpoints
    if code.size <= 256:
        order = order.astype(np.uint8)
    return order, mids.astype(np.float32)


def nearest_code(scaled: np.ndarray, code: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Code of the nearest level for each scaled value; on a tie, the lower level.

    ``exact=False``: the decision boundaries are the float32 midpoints of
    :func:`decision_boundaries` (bitsandbytes' 4-bit CPU rule). ``exact=True``: the exact
    midpoints (a + b)/2, held in float64 where they are exact for float32 levels, so the
    result is the exactly nearest level (used for the 8-bit constants of double
    quantization). The two differ only for a value lying exactly on a float32 midpoint
    that rounding moved. Returns uint8 codes of the same shape.
    """
    order, mids = decision_boundaries(code)
    s = np.asarray(scaled)
    if exact:
        srt = np.asarray(code, dtype=np.float64)[order]
        mids64 = (srt[:-1] + srt[1:]) / 2.0  # exact for float32 levels
        bucket = np.searchsorted(mids64, s.astype(np.float64), side="left")
    else:
        # bucket k = #{m : m < s}: s ≤ m_k stays in bucket k (ties to the lower level)
        bucket = np.searchsorted(mids, s.astype(np.float32), side="left")
    return order[bucket].astype(np.uint8)
