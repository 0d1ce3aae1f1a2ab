"""Double quantization (QLoRA §3): quantize the absmax constants themselves.

First-level quantization stores one float32 absmax per block of 64 weights: 32/64 = 0.5
extra bits per parameter. QLoRA quantizes those constants again:

    μ   = mean(c)                                   (one float32 per tensor)
    c′  = c − μ                                     (centred: signed, so a signed code)
    c′  → blocks of 256, absmax₂ per block, c′/absmax₂ → nearest level of the signed
          8-bit dynamic map (``create_dynamic_map(signed=True)``)
    ĉ   = code₂[q]·absmax₂ + μ                      (reconstruction)

Cost: 8/64 + 32/(64·256) ≈ 0.127 bits per parameter instead of 0.5 (plus 32 bits per
tensor for μ). The lecture's scheme (global max, linear uint8) is kept as
:func:`lecture_double_quantize`, a labelled simpler variant.

Two choices differ from bitsandbytes' CPU path, on purpose (measured in
``derivations/qlora.md``): μ is the float64 sum of the constants divided by their count,
rounded once to float32 (bitsandbytes sums in float32 in torch's order), and each scaled
constant gets the exactly nearest 8-bit level, ties to the lower (bitsandbytes' CPU kernel
finds it through a lookup table that is off by one level now and then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import backend
from .codebooks import dynamic_map_signed, nearest_code

__all__ = [
    "DQ_BLOCKSIZE",
    "DoubleQuantState",
    "bits_per_parameter",
    "dequantize_blockwise_8bit",
    "double_dequantize",
    "double_quantize",
    "lecture_double_dequantize",
    "lecture_double_quantize",
    "memory_table",
    "quantize_blockwise_8bit",
]

DQ_BLOCKSIZE = 256
_TINY = np.float32(1e-38)  # a zero block's scale is clamped to this: 0/tiny = 0, no NaN


@dataclass
class DoubleQuantState:
    """Second-level state: absmax₂ per block of 256 constants, the 8-bit map, the mean μ."""

    absmax: np.ndarray  # float32 (ceil(n_blocks / 256),)
    offset: np.float32  # μ, the mean subtracted before quantizing
    code: np.ndarray = field(default_factory=dynamic_map_signed)  # float32 (256,)
    blocksize: int = DQ_BLOCKSIZE

    def to(self, device: str) -> DoubleQuantState:
        """A copy whose arrays live on ``device`` ("numpy" or "cupy")."""
        return DoubleQuantState(
            backend.to_device(self.absmax, device),
            self.offset,
            backend.to_device(self.code, device),
            self.blocksize,
        )


def _block_absmax(x: np.ndarray, blocksize: int) -> np.ndarray:
    """max |x| over each block of the flat array; the last block over its valid items."""
    n = x.size
    full = n - n % blocksize
    am = np.abs(x[:full]).reshape(-1, blocksize).max(axis=1)  # (n_full,)
    if full < n:
        am = np.concatenate([am, [np.abs(x[full:]).max()]])
    return am.astype(np.float32)


def quantize_blockwise_8bit(
    x: np.ndarray, code: np.ndarray | None = None, blocksize: int = DQ_BLOCKSIZE
) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise absmax quantization of a flat float32 array: (codes uint8, absmax).

    s = x / absmax (float32 division, a zero block's absmax clamped to 1e-38), then the
    exactly nearest level of ``code`` (ties to the lower level).
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)  # (n,)
    code = dynamic_map_signed() if code is None else np.asarray(code, dtype=np.float32)
    if code.shape != (256,):
        raise ValueError(f"code: expected a (256,) table, got shape {code.shape}")
    if not isinstance(blocksize, int | np.integer) or blocksize < 1:
        raise ValueError(f"blocksize: expected a positive integer, got {blocksize!r}")
    absmax = _block_absmax(x, blocksize)  # (n_blocks,)
    scale = np.repeat(np.maximum(absmax, _TINY), blocksize)[: x.size]  # (n,)
    s = x / scale  # s = x / absmax₂, float32
    return nearest_code(s, code, exact=True), absmax


def dequantize_blockwise_8bit(
    q: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int = DQ_BLOCKSIZE
) -> np.ndarray:
    """x̂ = code[q]·absmax per block, float32 (in the namespace where ``q`` lives)."""
    xp = backend.xp_of(q)
    q = xp.asarray(q).reshape(-1)
    scale = xp.repeat(xp.asarray(absmax, dtype=xp.float32), blocksize)[: q.size]  # (n,)
    return xp.asarray(code, dtype=xp.float32)[q] * scale  # x̂ = code[q]·absmax


def double_quantize(
    absmax: np.ndarray, blocksize: int = DQ_BLOCKSIZE, code: np.ndarray | None = None
) -> tuple[np.ndarray, DoubleQuantState]:
    """Quantize first-level constants c as QLoRA does: (codes uint8, state). [qlora.double_quant]

    μ = fl32(Σc / n) with the sum in float64; c′ = fl32(c − μ); c′ is quantized in blocks
    of ``blocksize`` (256) with the signed 8-bit dynamic map. Reconstruction:
    ĉ = fl32(fl32(code₂[q]·absmax₂) + μ), see :func:`double_dequantize`.
    """
    c = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)  # (n_blocks,)
    if c.size == 0:
        raise ValueError("absmax: expected at least one constant, got an empty array")
    offset = np.float32(np.sum(c, dtype=np.float64) / c.size)  # μ = Σc / n, one rounding
    centred = c - offset  # c′ = c − μ, float32
    q, absmax2 = quantize_blockwise_8bit(centred, code, blocksize)
    code2 = dynamic_map_signed() if code is None else np.asarray(code, dtype=np.float32)
    return q, DoubleQuantState(absmax=absmax2, offset=offset, code=code2, blocksize=blocksize)


def double_dequantize(q: np.ndarray, state2: DoubleQuantState) -> np.ndarray:
    """ĉ = code₂[q]·absmax₂ + μ, float32, in that order of rounding (as bitsandbytes)."""
    c = dequantize_blockwise_8bit(q, state2.absmax, state2.code, state2.blocksize)
    return c + np.float32(state2.offset)  # ĉ = code₂[q]·absmax₂ + μ


def lecture_double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """The lecture's variant (§3.2.3), labelled: one global max, linear uint8.

    q = round(c / c_max · 255), ĉ = q/255 · c_max. Not QLoRA's scheme: no mean, no blocks,
    a linear code; its step c_max/255 gives a mean squared error c_max²/(12·255²).
    """
    c = np.asarray(absmax, dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)) or c.min() < 0:
        # the lecture's own example feeds N(0, 1) draws: negative values wrap around in uint8
        raise ValueError(
            "absmax: expected finite non-negative constants (absmax values), got "
            f"min {c.min() if c.size else 'n/a'}"
        )
    cmax = np.float32(c.max())
    q = np.rint(c / cmax * 255.0).astype(np.uint8)  # q = round(c/c_max · 255)
    return q, cmax


def lecture_double_dequantize(q: np.ndarray, cmax: np.float32) -> np.ndarray:
    """ĉ = q/255 · c_max (the lecture's variant)."""
    return (np.asarray(q, dtype=np.float64) / 255.0 * float(cmax)).astype(np.float32)


def bits_per_parameter(
    blocksize: int = 64,
    double_quant: bool = False,
    blocksize2: int = DQ_BLOCKSIZE,
    *,
    weight_bits: int = 4,
    n_params: float | None = None,
) -> float:
    """Storage bits per parameter of blockwise 4-bit quantization. [qlora.bits_per_param]

    Without double quantization: b + 32/B (4 + 32/64 = 4.5).
    With it: b + 8/B + 32/(B·B₂) (4 + 8/64 + 32/16384 = 4.126953125), plus 32/n for the
    per-tensor mean μ when ``n_params`` is given. Blocks are assumed full (n a multiple
    of B·B₂); a partial last block costs one more constant.
    """
    if blocksize < 1 or blocksize2 < 1:
        raise ValueError(f"blocksize: expected positive sizes, got {blocksize}, {blocksize2}")
    if not double_quant:
        return weight_bits + 32.0 / blocksize  # b + 32/B
    bits = weight_bits + 8.0 / blocksize + 32.0 / (blocksize * blocksize2)  # b + 8/B + 32/(B·B₂)
    if n_params is not None:
        bits += 32.0 / n_params  # μ: one float32 per tensor
    return bits


def memory_table(
    n_params: float = 65e9, blocksize: int = 64, blocksize2: int = DQ_BLOCKSIZE
) -> dict[str, float]:
    """Bytes for a model of ``n_params`` weights stored as one tensor (the lecture's 65B case).

    Keys: weights (4-bit), constants_fp32 (one float32 per block), constants_dq (QLoRA:
    8-bit codes + float32 absmax₂ per 256 + one float32 μ), constants_lecture (the
    lecture's variant: 8-bit codes + one float32 max), total_fp32, total_dq,
    saving_constants (fraction), saving_total (fraction), bits_fp32, bits_dq.
    """
    n_blocks = np.ceil(n_params / blocksize)  # B = ⌈n / 64⌉
    n_blocks2 = np.ceil(n_blocks / blocksize2)  # ⌈B / 256⌉
    weights = n_params * 4 / 8  # 4 bits each
    const_fp32 = n_blocks * 4.0  # one float32 per block
    const_dq = n_blocks * 1.0 + n_blocks2 * 4.0 + 4.0  # 8-bit codes + absmax₂ + μ
    const_lecture = n_blocks * 1.0 + 4.0  # 8-bit codes + one global max
    return {
        "n_params": float(n_params),
        "n_blocks": float(n_blocks),
        "weights": float(weights),
        "constants_fp32": float(const_fp32),
        "constants_dq": float(const_dq),
        "constants_lecture": float(const_lecture),
        "total_fp32": float(weights + const_fp32),
        "total_dq": float(weights + const_dq),
        "saving_constants": float(1 - const_dq / const_fp32),
        "saving_total": float(1 - (weights + const_dq) / (weights + const_fp32)),
        "bits_fp32": float((weights + const_fp32) * 8 / n_params),
        "bits_dq": float((weights + const_dq) * 8 / n_params),
    }
