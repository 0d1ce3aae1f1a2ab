"""Registered checks for QLoRA quantization (derivations/qlora.md).

References, none computed by the code under test: the NF4 table printed in the QLoRA
paper's appendix; the FP4 bit layout as bitsandbytes' kernels spell it out; closed-form
bit counts and the bytes of an actual quantized state; a brute-force blockwise quantizer
(per-block loops, float64 distances to every level, first minimum on a tie) and an exact
(``math.fsum``) mean for double quantization. No torch needed; each check runs in well
under a second.
"""

from __future__ import annotations

import math

import numpy as np

from ...quant import codebooks as cb
from ...quant.blockwise import dequantize_4bit, quantize_4bit
from ...quant.double_quant import bits_per_parameter, double_dequantize, double_quantize
from .. import Outcome, equation

# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 values as printed there.
_PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip

# bitsandbytes' FP4 kernel comments: 3-bit magnitudes 0b000…0b111 = 0, 0.0625, 8, 12, 4, 6,
# 2, 3; bit 3 is the sign; the table is divided by 12.
_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]


def _brute_force_4bit(x: np.ndarray, blocksize: int, code: np.ndarray):
    """Blockwise absmax + nearest level, by loops and float64 distances (reference)."""
    flat = x.reshape(-1).astype(np.float32)
    lv = code.astype(np.float64)
    codes = np.empty(flat.size, dtype=np.int64)
    absmax = []
    for start in range(0, flat.size, blocksize):
        blk = flat[start : start + blocksize].astype(np.float64)
        c = float(np.max(np.abs(blk)))
        absmax.append(c)
        s = blk / c if c > 0 else np.zeros_like(blk)
        for i, v in enumerate(s):
            codes[start + i] = int(np.argmin(np.abs(v - lv)))  # first minimum on a tie
    absmax_arr = np.array(absmax)
    xhat = lv[codes] * np.repeat(absmax_arr, blocksize)[: flat.size]
    return absmax_arr, xhat


@equation(
    "qlora.nf4_codebook",
    what="NF4 = sort({Φ⁻¹(pᵢ)}₈ ∪ {0} ∪ {−Φ⁻¹(pⱼ)}₇)/Φ⁻¹(0.9677) equals the QLoRA appendix table",
    derivation="qlora.md",
    implements=cb.create_normal_map,
    tol=0.0,
)
def _check_nf4() -> Outcome:
    ours = cb.create_normal_map()  # from the definition (float32 arithmetic as published)
    paper = np.array(_PAPER_NF4, dtype=np.float32)
    err = float(np.max(np.abs(ours.astype(np.float64) - paper)))
    exact = cb.create_normal_map(exact=True).astype(np.float64)  # ≤ 1.2e-7 from the table
    arrays = {"nf4": ours.astype(np.float64), "paper": paper.astype(np.float64), "exact": exact}
    return Outcome(err, arrays)


@equation(
    "qlora.fp4_codebook",
    what="FP4 code c ↦ (−1)^(c>>3)·m(c&7)/12, m = 0, 1/16, 8, 12, 4, 6, 2, 3 (bitsandbytes)",
    derivation="qlora.md",
    implements=cb.fp4_codebook,
    tol=0.0,
)
def _check_fp4() -> Outcome:
    mags = np.array(_FP4_MAGNITUDES) / 12.0
    ref = np.concatenate([mags, -mags]).astype(np.float32)  # sign-magnitude, bit 3 = sign
    ours = cb.fp4_codebook()
    err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
    return Outcome(err, {"fp4": ours.astype(np.float64), "reference": ref.astype(np.float64)})


@equation(
    "qlora.bits_per_param",
    what="bits/param = 4 + 32/64 = 4.5; double quant: 4 + 8/64 + 32/(64·256) = 4.12695…",
    derivation="qlora.md",
    implements=bits_per_parameter,
    tol=1e-12,
)
def _check_bits() -> Outcome:
    n = 64 * 256 * 4  # whole blocks at both levels
    x = np.random.default_rng(11).standard_normal(n).astype(np.float32)
    packed, state = quantize_4bit(x, 64, "nf4", double_quant=True)
    stored = packed.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes + 4  # + μ
    measured = stored * 8 / n
    errs = [
        abs(bits_per_parameter(64) - 4.5),
        abs(bits_per_parameter(64, True) - (4 + 8 / 64 + 32 / (64 * 256))),
        abs(bits_per_parameter(64, True, n_params=n) - measured),
    ]
    arrays = {"bits_plain": np.array([4.5]), "bits_dq": np.array([measured])}
    return Outcome(max(errs), arrays)


@equation(
    "qlora.blockwise_roundtrip",
    what="x̂ = code[q]·c_b, q = nearest level of x/c_b; |x − x̂| ≤ c_b·max half gap",
    derivation="qlora.md",
    implements=quantize_4bit,
    tol=1e-6,
)
def _check_roundtrip() -> Outcome:
    rng = np.random.default_rng(12)
    x = rng.standard_normal(64 * 6 + 23).astype(np.float32)
    x[64:128] = 0.0  # a zero block
    errs = []
    arrays: dict[str, np.ndarray] = {"x": x.astype(np.float64)}
    for qt in ("nf4", "fp4"):
        code = cb.get_codebook(qt)
        packed, state = quantize_4bit(x, 64, qt)
        xhat = dequantize_4bit(packed, state).astype(np.float64)
        absmax_ref, xhat_ref = _brute_force_4bit(x, 64, code)
        lv = cb.sorted_levels(code)
        half_gap = float(np.max(np.diff(lv))) / 2
        c = np.repeat(absmax_ref, 64)[: x.size]
        excess = np.abs(x - xhat) - c * half_gap  # ≤ 0 by the bound
        errs.append(max(0.0, float(np.max(excess / np.maximum(c, 1e-30)))))
        errs.append(float(np.max(np.abs(xhat - xhat_ref))) / float(np.max(np.abs(x))))
        errs.append(float(np.max(np.abs(state.absmax - absmax_ref))))
        arrays[f"packed_{qt}"] = packed
        arrays[f"absmax_{qt}"] = state.absmax.astype(np.float64)
        arrays[f"xhat_{qt}"] = xhat
    return Outcome(max(errs), arrays)


@equation(
    "qlora.double_quant",
    what="ĉ = code₂[q]·absmax₂ + μ, q = nearest 8-bit dynamic level of (c − μ)/absmax₂ per 256",
    derivation="qlora.md",
    implements=double_quantize,
    tol=1e-6,
)
def _check_double_quant() -> Outcome:
    rng = np.random.default_rng(13)
    x = (rng.standard_normal(64 * 256 * 2 + 64 * 40) * 0.02).astype(np.float32)
    _, st = quantize_4bit(x, 64, "nf4")
    c = st.absmax  # first-level constants, float32
    q, s2 = double_quantize(c)
    chat = double_dequantize(q, s2).astype(np.float64)
    # reference: exact mean, per-256 absmax, brute-force nearest dynamic level
    mu = float(np.float32(math.fsum(c.astype(np.float64).tolist()) / c.size))
    centred = (c - np.float32(mu)).astype(np.float32)
    code = cb.dynamic_map_signed().astype(np.float64)
    ref = np.empty(c.size)
    for start in range(0, c.size, 256):
        blk = centred[start : start + 256]
        a2 = np.float32(np.max(np.abs(blk)))
        s = (blk / a2).astype(np.float64)  # float32 division, as specified
        idx = np.argmin(np.abs(s[:, None] - code[None, :]), axis=1)  # first: lower on a tie
        ref[start : start + 256] = np.float32(code[idx].astype(np.float32) * a2) + np.float32(mu)
    err = float(np.max(np.abs(chat - ref)) / np.max(c))
    arrays = {"absmax": c.astype(np.float64), "q": q, "reconstructed": chat}
    return Outcome(err, arrays)
