"""Neural-network modules: the Module tree, basic layers and attention."""

from .conv1d import Conv1D
from .layers import MLP, Dropout, Embedding, LayerNorm, Linear, kaiming_uniform
from .module import Module, ModuleList, Parameter

__all__ = [
    "MLP", "Dropout", "Embedding", "LayerNorm", "Linear", "Module", "ModuleList", "Parameter",
    "kaiming_uniform",
]  # fmt: skip

from .attention import (  # H2: attention exports
    MultiHeadAttention,
    attention_reference,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)

__all__ += [
    "MultiHeadAttention", "attention_reference", "merge_heads", "scaled_dot_product_attention",
    "split_heads",
]  # fmt: skip

__all__ += ["Conv1D"]  # H3: GPT-2's (in, out) linear layer
