"""minipeft.quant: Lloyd-Max, codebooks, bitsandbytes-compatible 4-bit, QLoRA and LoftQ."""

from typing import Any

from ..kernels.cpu.gemv4 import gemv_4bit
from .blockwise import QuantState, dequantize_4bit, load_4bit, quantize_4bit, save_4bit
from .codebooks import (
    NF4_PUBLISHED,
    create_dynamic_map,
    create_normal_map,
    dynamic_map_signed,
    fp4_codebook,
    get_codebook,
    int4_codebook,
    nearest_code,
    nf4_codebook,
)
from .double_quant import DoubleQuantState, bits_per_parameter, double_dequantize, double_quantize
from .lloyd_max import lloyd_max_gaussian, lloyd_max_samples
from .loftq import loftq_init, loftq_model
from .qlora import QuantizedWeightError, Weight4bit

__all__ = [
    "NF4_PUBLISHED",
    "DoubleQuantState",
    "Linear4bit",
    "QuantState",
    "QuantizedWeightError",
    "Weight4bit",
    "bits_per_parameter",
    "create_dynamic_map",
    "create_normal_map",
    "dequantize_4bit",
    "double_dequantize",
    "double_quantize",
    "dynamic_map_signed",
    "fp4_codebook",
    "gemv_4bit",
    "get_codebook",
    "int4_codebook",
    "lloyd_max_gaussian",
    "lloyd_max_samples",
    "load_4bit",
    "loftq_init",
    "loftq_model",
    "nearest_code",
    "nf4_codebook",
    "quantize_4bit",
    "quantize_model",
    "save_4bit",
]


def __getattr__(name: str) -> Any:
    """``Linear4bit`` and ``quantize_model`` live in ``minipeft.peft.qlora`` (adapters live in
    ``peft/``); they resolve here lazily so that importing ``quant`` never imports ``peft``."""
    if name in ("Linear4bit", "quantize_model"):
        from ..peft import qlora

        return getattr(qlora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
