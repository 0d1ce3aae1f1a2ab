"""IA3 (Liu et al., 2022) and BitFit (Ben Zaken et al., 2022): the smallest adapters.

IA3 learns one vector per adapted layer, initialized to ones (the identity):

    output scaling (attention projections):  H = (X·W₀ᵀ + b) ⊙ l      l ∈ ℝ^out   [ia3.forward_out]
    input scaling (feed-forward layers):     H = (X ⊙ l)·W₀ᵀ + b      l ∈ ℝ^in    [ia3.forward_in]

(HF PEFT's convention: for the feed-forward modules the vector multiplies the layer input;
elsewhere it multiplies the output, bias included.) With G = ∂L/∂H:

    ∂L/∂l = Σₙ G ⊙ (X·W₀ᵀ + b)        ∂L/∂X = (G ⊙ l)·W₀                      [ia3.grad_out]
    ∂L/∂l = Σₙ X ⊙ (G·W₀)             ∂L/∂X = (G·W₀) ⊙ l                      [ia3.grad_in]

BitFit trains only the biases: ``apply_bitfit`` freezes every other parameter.
"""

from __future__ import annotations

import numpy as np

from ..autograd.tensor import Function, Tensor
from ..backend import Array
from ..nn.module import Module, Parameter
from .config import check_adapter_name
from .lora import AdapterLayer, _AdapterDict, base_layout

__all__ = ["IA3Function", "IA3Layer", "apply_bitfit", "ia3_linear"]


class IA3Function(Function):
    """IA3's scaled linear layer with fused backward (module docstring).

    Inputs x, w0, [bias], l; ``l`` has HF PEFT's shape: (out, 1) for output scaling,
    (1, in) for input scaling (``is_feedforward``).
    """

    def forward(
        self, x: Array, w0: Array, *rest: Array, is_feedforward: bool, fan_in_fan_out: bool,
        has_bias: bool,
    ) -> Array:  # fmt: skip
        bias = rest[0] if has_bias else None
        l = rest[-1].reshape(-1)  # (out,) or (in,)
        self.lead, k = x.shape[:-1], x.shape[-1]
        xs = x.reshape(-1, k)  # (N, in)
        w_oi = w0.T if fan_in_fan_out else w0  # (out, in)
        if is_feedforward:
            h = (xs * l) @ w_oi.T  # H = (X ⊙ l)·W₀ᵀ
            if bias is not None:
                h = h + bias
            self.saved = (xs, None)
        else:
            base = xs @ w_oi.T  # X·W₀ᵀ
            if bias is not None:
                base = base + bias
            h = base * l  # H = (X·W₀ᵀ + b) ⊙ l
            self.saved = (None, base)
        self.w_oi, self.l, self.ff, self.has_bias, self.lshape = (
            w_oi, l, is_feedforward, has_bias, rest[-1].shape,
        )  # fmt: skip
        return h.reshape(*self.lead, h.shape[-1])

    def backward(self, grad: Array) -> tuple[Array | None, ...]:
        g = grad.reshape(-1, grad.shape[-1])  # G (N, out)
        xs, base = self.saved
        gx = gbias = gl = None
        i_l = 3 if self.has_bias else 2
        if self.ff:
            gw = g @ self.w_oi  # G·W₀   (N, in)
            if self.needs_input_grad[0]:
                gx = gw * self.l  # ∂L/∂X = (G·W₀) ⊙ l
            if self.needs_input_grad[i_l]:
                gl = (xs * gw).sum(axis=0)  # ∂L/∂l = Σₙ X ⊙ (G·W₀)
            if self.has_bias and self.needs_input_grad[2]:
                gbias = g.sum(axis=0)
        else:
            gs = g * self.l  # G ⊙ l
            if self.needs_input_grad[0]:
                gx = gs @ self.w_oi  # ∂L/∂X = (G ⊙ l)·W₀
            if self.needs_input_grad[i_l]:
                gl = (g * base).sum(axis=0)  # ∂L/∂l = Σₙ G ⊙ (X·W₀ᵀ + b)
            if self.has_bias and self.needs_input_grad[2]:
                gbias = gs.sum(axis=0)
        if gx is not None:
            gx = gx.reshape(*self.lead, gx.shape[-1])
        if gl is not None:
            gl = gl.reshape(self.lshape)
        head = [gx, None] + ([gbias] if self.has_bias else [])
        return (*head, gl)


def ia3_linear(
    x: Tensor,
    w0: Tensor,
    bias: Tensor | None,
    l: Tensor,
    *,
    is_feedforward: bool,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """IA3 output or input scaling.

    [ia3.forward_out] [ia3.forward_in] [ia3.grad_out] [ia3.grad_in]
    """
    out_f, in_f = (w0.shape[1], w0.shape[0]) if fan_in_fan_out else w0.shape
    want = (1, in_f) if is_feedforward else (out_f, 1)
    if l.shape != want:
        raise ValueError(f"l: expected shape {want}, got {l.shape}")
    if w0.requires_grad:
        raise ValueError("w0: IA3's base weight must be frozen (requires_grad=False)")
    head = [x, w0] + ([bias] if bias is not None else [])
    return IA3Function.apply(
        *head,
        l,
        is_feedforward=bool(is_feedforward),
        fan_in_fan_out=bool(fan_in_fan_out),
        has_bias=bias is not None,
    )


class IA3Layer(AdapterLayer):
    """A frozen base layer with an IA3 vector ``ia3_l.<name>`` (HF PEFT names and shapes)."""

    def __init__(
        self,
        base: Module,
        name: str,
        *,
        is_feedforward: bool,
        fan_in_fan_out: bool | None = None,
        init_ia3_weights: bool = True,
    ) -> None:
        super().__init__()
        check_adapter_name(name)
        self.in_features, self.out_features, self.fan_in_fan_out = base_layout(base, fan_in_fan_out)
        base.requires_grad_(False)  # the base layer is frozen: the point of PEFT
        self.base_layer = base
        self.adapter_name = name
        self.is_feedforward = bool(is_feedforward)
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        dt = base.weight.dtype
        init = np.ones(shape, dt) if init_ia3_weights else np.random.default_rng(0).normal(
            1.0, 0.02, shape
        ).astype(dt)  # fmt: skip
        self.ia3_l = _AdapterDict()
        setattr(self.ia3_l, name, Parameter(init))
        self.disabled = False
        self.merged = False

    @property
    def vector(self) -> Parameter:
        return getattr(self.ia3_l, self.adapter_name)

    def merge(self) -> None:
        """W₀ ← W₀ ⊙ l (columns for input scaling, rows and the bias for output scaling)."""
        if self.merged:
            return
        l = self.vector.data.reshape(-1)
        w = self.base_layer.weight.data
        w_oi = w.T if self.fan_in_fan_out else w  # a view: writes go to W₀
        object.__setattr__(self, "_saved_w", w.copy())
        bias = getattr(self.base_layer, "bias", None)
        object.__setattr__(self, "_saved_b", None if bias is None else bias.data.copy())
        if self.is_feedforward:
            w_oi *= l[None, :]
        else:
            w_oi *= l[:, None]
            if bias is not None:
                bias.data *= l
        self.merged = True

    def unmerge(self) -> None:
        """Restore W₀ (and b) exactly (kept at merge: l may have zeros)."""
        if not self.merged:
            return
        self.base_layer.weight.data[...] = self._saved_w
        if self._saved_b is not None:
            self.base_layer.bias.data[...] = self._saved_b
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_output(x)
        if h is not None:
            return h
        base = self.base_layer
        return ia3_linear(
            x,
            base.weight,
            getattr(base, "bias", None),
            self.vector,
            is_feedforward=self.is_feedforward,
            fan_in_fan_out=self.fan_in_fan_out,
        )


def apply_bitfit(model: Module) -> tuple[int, int]:
    """BitFit: freeze every parameter whose name does not end in ``bias``.

    Returns (trainable, total) parameter counts.
    """
    trainable = total = 0
    for name, p in model.named_parameters():
        flag = name.rsplit(".", 1)[-1] == "bias"
        p.requires_grad_(flag)
        total += p.size
        trainable += p.size if flag else 0
    if trainable == 0:
        raise ValueError("model: has no parameter named '*.bias'; BitFit would train nothing")
    return trainable, total
