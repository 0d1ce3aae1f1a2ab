"""Registered checks for the 4-bit kernels (derivations/qlora.md#qlora.gemv4).

Reference, not computed by the code under test: Ŵ decoded here by hand (nibbles by shifts,
scales by ``np.repeat``; double-quantized scales from the codes, the 8-bit map and μ), then
y = Ŵ·x in float64 with ``math.fsum`` per row. The fused GEMV is float32 with its own
summation order, so the error is measured against the classical bound for a dot product of
length n with one extra rounding per product (the scaled table code·c_b):

    |y_r − Σ_i ŵ_ri x_i| ≤ γ_{n+2} · Σ_i |ŵ_ri x_i|,   γ_k = k·u / (1 − k·u),  u = 2⁻²⁴

error = max_r |y_r − ref_r| / (γ_{n+2}·Σ_i|ŵ_ri x_i|), which must be ≤ 1.
"""

from __future__ import annotations

import math

import numpy as np

from ...kernels.cpu.gemv4 import gemv_4bit
from ...quant.blockwise import quantize_4bit
from .. import Outcome, equation

_U = 2.0**-24  # unit roundoff of float32


def _decode(packed: np.ndarray, state) -> np.ndarray:
    """Ŵ in float64 from the bytes and the state, written out independently."""
    n = state.numel
    q = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]  # high nibble first
    if state.state2 is None:
        c = state.absmax.astype(np.float64)
    else:  # ĉ = fl32(fl32(code₂[q]·absmax₂) + μ)
        s2 = state.state2
        a2 = np.repeat(s2.absmax, s2.blocksize)[: state.absmax.size]
        c = ((s2.code[state.absmax] * a2).astype(np.float32) + np.float32(s2.offset)).astype(
            np.float64
        )
    scale = np.repeat(c, state.blocksize)[:n]
    w = (state.code.astype(np.float32)[q].astype(np.float64) * scale).astype(np.float32)
    return w.astype(np.float64).reshape(state.shape)  # ŵ = fl32(code[q]·c_b)


@equation(
    "qlora.gemv4",
    what="fused 4-bit GEMV y = Σᵢ (code[qᵢ]·c_b)·xᵢ within γ_{n+2}·Σ|ŵx| of float64",
    derivation="qlora.md",
    implements=gemv_4bit,
    tol=1.0,
)
def _check_gemv4() -> Outcome:
    rng = np.random.default_rng(4)
    worst = 0.0
    arrays: dict[str, np.ndarray] = {}
    # (out, in, blocksize, double quant): rows of whole blocks (the SIMD path) and rows
    # that straddle blocks (the portable path)
    for out_f, in_f, bs, dq in ((24, 128, 64, False), (16, 256, 32, True), (9, 50, 64, False)):
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        x = rng.standard_normal(in_f).astype(np.float32)
        packed, state = quantize_4bit(w, bs, "nf4", dq)
        w_hat = _decode(packed, state)
        ref = np.array([math.fsum(w_hat[r] * x.astype(np.float64)) for r in range(out_f)])
        mag = np.abs(w_hat) @ np.abs(x.astype(np.float64))  # Σ|ŵ x|
        k = in_f + 2
        gamma = k * _U / (1 - k * _U)
        y = gemv_4bit(packed, state, x, impl="numba").astype(np.float64)
        worst = max(worst, float(np.max(np.abs(y - ref) / (gamma * mag))))
        if not arrays:
            arrays = {"w_hat": w_hat, "x": x.astype(np.float64), "y": ref}
    return Outcome(error=worst, arrays=arrays)
