"""Neural-network modules: the Module tree, basic layers (GPT-2's (in, out) Conv1D among
them) and attention."""

from .attention import (
    MultiHeadAttention,
    attention_reference,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)
from .conv1d import Conv1D
from .layers import MLP, Dropout, Embedding, LayerNorm, Linear, kaiming_uniform
from .module import Module, ModuleList, Parameter

__all__ = [
    "MLP", "Conv1D", "Dropout", "Embedding", "LayerNorm", "Linear", "Module", "ModuleList",
    "MultiHeadAttention", "Parameter", "attention_reference", "kaiming_uniform", "merge_heads",
    "scaled_dot_product_attention", "split_heads",
]  # fmt: skip
