"""Neural-network modules: the Module tree, basic layers and attention."""

from .layers import MLP, Dropout, Embedding, LayerNorm, Linear, kaiming_uniform
from .module import Module, ModuleList, Parameter

__all__ = [
    "MLP", "Dropout", "Embedding", "LayerNorm", "Linear", "Module", "ModuleList", "Parameter",
    "kaiming_uniform",
]  # fmt: skip
