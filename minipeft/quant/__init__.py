"""minipeft.quant: codebooks, bitsandbytes-compatible blockwise 4-bit and double quantization."""

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

__all__ = [
    "NF4_PUBLISHED",
    "DoubleQuantState",
    "QuantState",
    "bits_per_parameter",
    "create_dynamic_map",
    "create_normal_map",
    "dequantize_4bit",
    "double_dequantize",
    "double_quantize",
    "dynamic_map_signed",
    "fp4_codebook",
    "get_codebook",
    "int4_codebook",
    "load_4bit",
    "nearest_code",
    "nf4_codebook",
    "quantize_4bit",
    "save_4bit",
]
