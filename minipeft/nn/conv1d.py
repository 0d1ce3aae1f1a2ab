"""GPT-2's ``Conv1D``: a linear layer that stores its weight as (in, out).

Despite the name it is no convolution: OpenAI's GPT (and GPT-2) wrote every projection as
y = x·W + b with W of shape (in_features, out_features), the transpose of PyTorch's
``nn.Linear``. Hugging Face kept the layout (``transformers.pytorch_utils.Conv1D``), so a
GPT-2 checkpoint stores ``c_attn.weight`` as (n_embd, 3·n_embd). minipeft keeps it too:
state dicts load without transposes, and a LoRA adapter on a Conv1D layer must know it
(HF PEFT's ``fan_in_fan_out=True``).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Tensor
from .module import Module, Parameter

__all__ = ["Conv1D"]


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
        lead = x.shape[:-1]
        # Flatten the leading axes so the product is one 2-D GEMM (and so is its weight
        # gradient Wᾱ = Xᵀ·Ḡ, instead of one product per batch entry summed afterwards).
        x2 = ops.reshape(x, (-1, self.in_features))  # (N, in)
        y = ops.matmul(x2, self.weight) + self.bias  # y = x·W + b   (N, out)
        return ops.reshape(y, (*lead, self.out_features))  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"
