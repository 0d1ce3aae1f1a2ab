"""GPT-2's ``Conv1D``: a linear layer that stores its weight as (in, out).

Despite the name it is no convolution: OpenAI's GPT (and GPT-2) wrote every projection as
y = x·W + b with W of shape (in_features, out_features), the transpose of PyTorch's
``nn.Linear``. Hugging Face kept the layout (``transformers.pytorch_utils.Conv1D``), so a
GPT-2 checkpoint stores ``c_attn.weight`` as (n_embd, 3·n_embd). minipeft keeps it too:
state dicts load without transposes, and a LoRA adapter on a Conv1D layer must know it
(HF PEFT's ``fan_in_fan_out=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Function, Tensor, _coerce_inputs
from .module import Module, Parameter

__all__ = ["Conv1D", "Conv1DFunction", "conv1d"]


class Conv1DFunction(Function):
    """Y = X·W + b over the last axis of X, fused.   [gpt2.conv1d_vjp]

    Shapes: X (..., in) flattened to (N, in), W (in, out), b (out,), Y (..., out).

        forward:   Y = X·W + b                  one GEMM, b added in place
        backward:  X̄ = Ḡ·Wᵀ,  W̄ = Xᵀ·Ḡ,  b̄ = Σₙ Ḡₙ   (each only if needed)

    One node instead of reshape → matmul → add → reshape: no separate (N, out) array
    for the bias sum, and a frozen W (PEFT) is never differentiated: X is kept for
    backward only when W̄ is needed, W only when X̄ is.
    """

    def forward(self, x: Any, weight: Any, bias: Any) -> Any:
        n_in, n_out = weight.shape
        self.x_shape = x.shape
        x2 = x.reshape(-1, n_in)  # (N, in)
        self.x2 = x2 if self.needs_input_grad[1] else None
        self.w = weight if self.needs_input_grad[0] else None
        y = x2 @ weight  # Y = X·W   (N, out)
        y += bias  # + b, in place
        return y.reshape((*x.shape[:-1], n_out))  # (..., out)

    def backward(self, g: Any) -> Any:
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = gw = gb = None
        if self.needs_input_grad[0]:
            gx = (g2 @ self.w.T).reshape(self.x_shape)  # X̄ = Ḡ·Wᵀ
        if self.needs_input_grad[1]:
            gw = self.x2.T @ g2  # W̄ = Xᵀ·Ḡ   (in, out)
        if self.needs_input_grad[2]:
            gb = g2.sum(axis=0)  # b̄ = Σₙ Ḡₙ
        return gx, gw, gb


def conv1d(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """y = x·W + b with W (in, out) — GPT-2's Conv1D as one differentiable op."""
    tx, tw, tb = _coerce_inputs((x, weight, bias))
    if tw.ndim != 2:
        raise ValueError(f"weight: expected shape (in, out), got {tw.shape}")
    if tx.ndim < 1 or tx.shape[-1] != tw.shape[0]:
        raise ValueError(
            f"x: expected last dimension {tw.shape[0]} (weight is {tw.shape}), got {tx.shape}"
        )
    if tb.shape != (tw.shape[1],):
        raise ValueError(f"bias: expected shape ({tw.shape[1]},), got {tb.shape}")
    if len({tx.dtype, tw.dtype, tb.dtype}) != 1:
        raise TypeError(
            f"conv1d: x, weight and bias must share a dtype, got {tx.dtype}, {tw.dtype}, {tb.dtype}"
        )
    return Conv1DFunction.apply(tx, tw, tb)


class Conv1D(Module):
    """y = x·W + b with W of shape (in_features, out_features) — GPT-2 / HF layout.

    Arguments are (in_features, out_features) like ``Linear``; HF's constructor takes
    them the other way round, ``Conv1D(nf=out, nx=in)``. Initialization follows HF:
    W ~ N(0, std²) (std = 0.02 unless given), b = 0.
    """

    def __init__(self, in_features: int, out_features: int, std: float = 0.02) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not std >= 0:
            raise ValueError(f"std: expected a non-negative number, got {std!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        dt = backend.default_dtype()
        w = backend.rng().normal(0.0, std, size=(self.in_features, self.out_features))
        self.weight = Parameter(w.astype(dt))  # (in, out)
        self.bias = Parameter(np.zeros(self.out_features, dtype=dt))  # (out,)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected last dimension {self.in_features} (in_features), got shape {x.shape}"
            )
        return conv1d(x, self.weight, self.bias)  # y = x·W + b   (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"
