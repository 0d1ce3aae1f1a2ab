"""minipeft.quant: codebooks, bitsandbytes-compatible blockwise 4-bit and double quantization."""

from .codebooks import (
    NF4_PUBLISHED,
    create_dynamic_map,
    create_normal_map,
    dynamic_map_signed,
    fp4_codebook,
    get_codebook,
    int4_codebook,
    nf4_codebook,
)

__all__ = [
    "NF4_PUBLISHED",
    "create_dynamic_map",
    "create_normal_map",
    "dynamic_map_signed",
    "fp4_codebook",
    "get_codebook",
    "int4_codebook",
    "nf4_codebook",
]
