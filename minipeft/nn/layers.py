"""Basic layers with PyTorch names and layouts: Linear (out, in), Embedding, LayerNorm, ..."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Tensor
from .module import Module, Parameter

__all__ = ["MLP", "Dropout", "Embedding", "LayerNorm", "Linear", "kaiming_uniform"]


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, a: float = math.sqrt(5)) -> np.ndarray:
    """U(−b, b) with b = √(6 / ((1 + a²)·fan_in)) — PyTorch's default for Linear weights."""
    bound = math.sqrt(6.0 / ((1 + a * a) * fan_in)) if fan_in > 0 else 0.0
    return backend.rng().uniform(-bound, bound, size=shape).astype(backend.default_dtype())


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1, else ValueError ``NAME: expected a positive integer, got …``.

    The one positive-integer check of layers, model configs, the diffusion model and the
    experiments; bool is refused (``True`` is not a width) and NumPy integers accepted.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


class Linear(Module):
    """y = x·Wᵀ + b with W of shape (out_features, in_features) — PyTorch's layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.weight = Parameter(kaiming_uniform((out_features, in_features), in_features))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = Parameter(
                backend.rng().uniform(-bound, bound, out_features).astype(backend.default_dtype())
            )
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected last dimension {self.in_features} (in_features), got shape {x.shape}"
            )
        y = ops.matmul(x, ops.transpose(self.weight, (1, 0)))  # (..., out)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table (num_embeddings, embedding_dim), initialized N(0, 1) as PyTorch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 1.0) -> None:
        super().__init__()
        self.num_embeddings = check_positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        w = backend.rng().standard_normal((num_embeddings, embedding_dim)) * std
        self.weight = Parameter(w.astype(backend.default_dtype()))

    def forward(self, ids: Any, *, check_range: bool = True) -> Tensor:
        return ops.embedding(self.weight, ids, check_range=check_range)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """LayerNorm over the last axis with affine weight (ones) and bias (zeros)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape = check_positive_int("normalized_shape", normalized_shape)
        self.eps = float(eps)
        dt = backend.default_dtype()
        self.weight = Parameter(np.ones(normalized_shape, dtype=dt))
        self.bias = Parameter(np.zeros(normalized_shape, dtype=dt))

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout, active only in training mode."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: dropout probability must lie in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_ACTIVATIONS = {"gelu": ops.gelu, "relu": ops.relu, "tanh": ops.tanh}


class MLP(Module):
    """Two-layer feed-forward block: fc2(act(fc1(x))), with dropout after fc2."""

    def __init__(
        self, d_model: int, d_hidden: int, activation: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.fc1 = Linear(d_model, d_hidden)
        self.fc2 = Linear(d_hidden, d_model)
        self.activation = activation
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(_ACTIVATIONS[self.activation](self.fc1(x))))
