"""The QLoRA layer: a frozen 4-bit base dequantized on the fly, LoRA on top.

Derivation: derivations/qlora_layer.md. The 4-bit number format (``Weight4bit``: packed codes
and their ``QuantState``) lives in ``minipeft.quant.qlora``; this module holds the layer that
carries adapters over it, as HF PEFT's ``tuners/lora/bnb.py`` sits over bitsandbytes.

QLoRA (Dettmers et al., 2023) stores the frozen weight W in 4 bits (NF4 or FP4, blockwise
absmax, optionally double-quantized) and trains LoRA factors in full precision. With
Ŵ = dequant(packed, state) — the float matrix the 4 bits stand for — and G = ∂L/∂H:

    H     = X·Ŵᵀ + b + Σᵢ sᵢ·(X̃ᵢ·Aᵢᵀ)·Bᵢᵀ                      [qlora.linear4bit_forward]
    ∂L/∂X = G·Ŵ + Σᵢ sᵢ·(G·Bᵢ)·Aᵢ (⊙ the dropout multiplier)     [qlora.linear4bit_grad_x]
    ∂L/∂A = s·(G·B)ᵀ·X̃,   ∂L/∂B = s·Gᵀ·(X̃·Aᵀ)                   [qlora.lora_grads]

The LoRA branch (forward and closed-form backward) is the one the float ``LoraFunction``
runs (``minipeft.peft.lora.lora_branch_forward``/``lora_branch_backward``); only the base
weight differs. The base has no gradient at all: W is not a parameter (its 4-bit codes
cannot be trained), so ∂L/∂W = Gᵀ·X is never formed. What backward keeps
(``Linear4bitFunction``): a reference to the module's own packed codes and state (no copy,
no extra bytes), X̃ and U = X̃·Aᵀ for each adapter (for ∂L/∂A, ∂L/∂B), and nothing else. Ŵ
lives only inside forward and is dequantized again in backward for ∂L/∂X — as bitsandbytes'
``MatMul4Bit`` does — so between forward and backward the layer costs its 4-bit storage,
not a float copy of W.

GPT-2's Conv1D stores W as (in, out) and computes X·W; ``Linear4bit`` quantizes the weight in
the layout it is stored in (``fan_in_fan_out=True`` for Conv1D), so its blocks run along the
stored rows. (transformers + bitsandbytes transpose a Conv1D weight to (out, in) before
quantizing; the bits per parameter are the same, the block grouping differs.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor
from ..backend import Array
from ..nn.module import Module, Parameter
from ..quant.blockwise import QuantState, quantize_4bit
from ..quant.qlora import Weight4bit
from .config import target_matches
from .lora import FusedLoraFunction, check_adapters

__all__ = [
    "Linear4bit",
    "Linear4bitFunction",
    "linear4bit",
    "quantize_model",
]


# ------------------------------------------------------------------------------ the Function
class Linear4bitFunction(FusedLoraFunction):
    """H = X·Ŵᵀ + b + Σᵢ sᵢ·(X̃ᵢ·Aᵢᵀ)·Bᵢᵀ with Ŵ = dequant(4-bit), and its closed-form backward.

    Inputs: ``x`` (..., in), optionally ``bias`` (out,) when ``has_bias``, then pairs
    ``A₁, B₁, A₂, B₂, …``. The 4-bit weight comes as the parameter ``weight`` (a
    ``Weight4bit``), not as an input: it has no gradient. ``fan_in_fan_out``: Ŵ is stored
    (in, out) (Conv1D) and H = X·Ŵ. The LoRA branch is the one ``LoraFunction`` runs
    (``minipeft.peft.lora.lora_branch_forward``/``lora_branch_backward``): only the base
    weight differs — Ŵ, dequantized in forward and again in backward, never kept between.
    """

    def forward(
        self,
        x: Array,
        *rest: Array,
        weight: Weight4bit,
        fan_in_fan_out: bool,
        has_bias: bool,
        scales: Sequence[float],
        masks: Sequence[Array | None],
    ) -> Array:
        bias = rest[0] if has_bias else None
        pairs = rest[1:] if has_bias else rest
        # Ŵ, transient: the base GEMM's operand, dropped when forward returns
        h = self.lora_forward(
            x, weight.dequantize(x.dtype), bias, pairs, scales, masks, fan_in_fan_out
        )
        self.xs = None  # no ∂L/∂W: the 4-bit codes are not a parameter
        # backward re-dequantizes for ∂L/∂X: keep a reference to the module's codes only
        self.weight = weight if self.needs_input_grad[0] else None
        return h

    def backward(self, grad: Array) -> tuple[Array | None, ...]:
        g = grad.reshape(-1, grad.shape[-1])  # G (N, out)
        gbias = None
        if self.has_bias and self.needs_input_grad[1]:
            gbias = g.sum(axis=0)  # ∂L/∂b = Σₙ Gₙ
        # Ŵ again, from the 4-bit codes, only when ∂L/∂X = G·Ŵ + … is needed
        w_hat = self.weight.dequantize(g.dtype) if self.needs_input_grad[0] else None
        gx, pair_grads = self.lora_backward(g, w_hat)
        head: list[Array | None] = [gx] + ([gbias] if self.has_bias else [])
        return tuple(head + pair_grads)


def linear4bit(
    x: Tensor,
    weight: Weight4bit,
    bias: Tensor | None = None,
    adapters: Sequence[tuple[Tensor, Tensor, float]] = (),
    *,
    masks: Sequence[Array | None] | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """QLoRA forward over a 4-bit base, with its fused closed-form backward.

    [qlora.linear4bit_forward]  H = X·Ŵᵀ + b + Σ sᵢ·(X̃·Aᵢᵀ)·Bᵢᵀ,   Ŵ = dequant(packed, state)
    [qlora.linear4bit_grad_x]   ∂L/∂X = G·Ŵ + Σ sᵢ·(G·Bᵢ)·Aᵢ   (Ŵ dequantized again in backward)
    [qlora.lora_grads]          ∂L/∂A = s·(G·B)ᵀ·X̃,  ∂L/∂B = s·Gᵀ·(X̃·Aᵀ)

    ``weight`` is a ``Weight4bit`` stored (out, in), or (in, out) with ``fan_in_fan_out``.
    ``adapters`` is a list of (A (r, in), B (out, r), s); ``masks`` each adapter's dropout
    multiplier M/(1−p) shaped like ``x`` (None: no dropout). No gradient exists for the base.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if not isinstance(weight, Weight4bit):
        raise TypeError(f"weight: expected a Weight4bit, got {type(weight).__name__}")
    out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    flat, masks = check_adapters(x, in_f, out_f, bias, adapters, masks)
    head = [x] + ([bias] if bias is not None else [])
    return Linear4bitFunction.apply(
        *head,
        *flat,
        weight=weight,
        fan_in_fan_out=bool(fan_in_fan_out),
        has_bias=bias is not None,
        scales=tuple(float(ad[2]) for ad in adapters),
        masks=tuple(masks),
    )


# ------------------------------------------------------------------------------ the layer
class Linear4bit(Module):
    """A frozen linear layer whose weight is stored in 4 bits: y = x·Ŵᵀ + b (or x·Ŵ + b).

    ``fan_in_fan_out=False``: the weight is (out, in) like ``Linear``; True: (in, out) like
    GPT-2's ``Conv1D``. The bias stays a float ``Parameter`` (frozen). Build one from a float
    layer with ``Linear4bit.from_float`` or from a weight with the constructor.
    ``LoraLayer`` recognises it (``is_4bit``) and runs ``lora_forward``: the fused QLoRA
    Function, so the LoRA backward never touches a gradient of the base.
    """

    is_4bit = True

    def __init__(
        self,
        weight: Any,
        bias: Any = None,
        *,
        fan_in_fan_out: bool = False,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        impl: str = "numba",
    ) -> None:
        super().__init__()
        w = weight.data if isinstance(weight, Tensor) else weight
        if getattr(w, "ndim", None) != 2:
            raise ValueError(f"weight: expected a 2-D array, got shape {getattr(w, 'shape', None)}")
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant, impl=impl)
        self._setup(Weight4bit(packed, state, impl=impl), bias, fan_in_fan_out)

    def _setup(self, w4: Weight4bit, bias: Any, fan_in_fan_out: bool) -> None:
        self.fan_in_fan_out = bool(fan_in_fan_out)
        rows, cols = w4.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        # a new layer lives on the current backend, as parameters do (codes and state copied
        # there once; quantization itself ran where the float weight was)
        self.weight = w4.to(backend.get_backend())  # not a Parameter: no gradient, no state
        if bias is not None:
            b = bias.data if isinstance(bias, Tensor) else bias
            if tuple(b.shape) != (self.out_features,):
                raise ValueError(f"bias: expected shape ({self.out_features},), got {b.shape}")
            b = backend.xp_of(b).array(b, dtype=w4.dtype)  # a copy, where b lives
            self.bias = Parameter(b, requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_quantized(
        cls, packed: np.ndarray, state: QuantState, bias: Any = None, *,
        fan_in_fan_out: bool = False, impl: str = "numba",
    ) -> Linear4bit:  # fmt: skip
        """A layer over codes that are already quantized (e.g. by LoftQ or bitsandbytes)."""
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer._setup(Weight4bit(packed, state, impl=impl), bias, fan_in_fan_out)
        return layer

    @classmethod
    def from_float(
        cls, layer: Module, *, quant_type: str = "nf4", blocksize: int = 64,
        double_quant: bool = False, impl: str = "numba",
    ) -> Linear4bit:  # fmt: skip
        """Quantize a ``Linear`` (out, in) or GPT-2 ``Conv1D`` (in, out) layer."""
        kind = type(layer).__name__
        if kind not in ("Linear", "Conv1D"):
            raise TypeError(f"layer: expected a Linear or Conv1D layer, got {kind}")
        return cls(
            layer.weight, getattr(layer, "bias", None), fan_in_fan_out=kind == "Conv1D",
            quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, impl=impl,
        )  # fmt: skip

    def _move_state(self, device: str) -> None:
        self.weight = self.weight.to(device)  # codes and quantization state follow the module

    def placement(self) -> str:
        return self.weight.placement()

    def forward(self, x: Tensor) -> Tensor:
        return linear4bit(x, self.weight, self.bias, fan_in_fan_out=self.fan_in_fan_out)

    def lora_forward(
        self,
        x: Tensor,
        adapters: Sequence[tuple[Tensor, Tensor, float]],
        masks: Sequence[Array | None] | None = None,
    ) -> Tensor:
        """The base plus LoRA adapters in one fused Function (called by ``LoraLayer``)."""
        return linear4bit(
            x, self.weight, self.bias, adapters, masks=masks, fan_in_fan_out=self.fan_in_fan_out
        )

    def dequantize(self) -> Array:
        """A float copy of Ŵ in the stored layout."""
        return self.weight.dequantize()

    @property
    def weight_nbytes(self) -> int:
        return self.weight.nbytes

    def bytes_per_param(self, include_codebooks: bool = False) -> float:
        """Bytes of weight storage per weight entry: 0.5 for the codes plus the constants."""
        st = self.weight.quant_state
        total = self.weight.nbytes
        if not include_codebooks:
            total -= st.code.nbytes + (st.state2.code.nbytes if st.state2 is not None else 0)
        return total / self.weight.size

    def extra_repr(self) -> str:
        st = self.weight.quant_state
        return (
            f"in={self.in_features}, out={self.out_features}, quant_type={st.quant_type}, "
            f"blocksize={st.blocksize}, double_quant={st.nested}, bias={self.bias is not None}"
        )


def quantize_model(
    model: Module,
    target_modules: str | list[str],
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    impl: str = "numba",
) -> list[str]:
    """Replace the matching ``Linear``/``Conv1D`` layers of ``model`` by ``Linear4bit``, in place.

    ``target_modules`` matches as in HF PEFT (a list of name suffixes, or a regex string
    matched in full). Returns the replaced names. A match that is not a Linear/Conv1D raises
    ValueError; so does a pattern that matches nothing.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a minipeft Module, got {type(model).__name__}")
    names = []
    for name, mod in model.named_modules():
        if not name or not target_matches(target_modules, name):
            continue
        if type(mod).__name__ not in ("Linear", "Conv1D"):
            raise ValueError(
                f"target_modules: {name!r} is a {type(mod).__name__}; only Linear and Conv1D "
                "layers can be quantized"
            )
        names.append(name)
    if not names:
        raise ValueError(f"target_modules: {target_modules!r} matched no module of the model")
    for name in names:
        q = Linear4bit.from_float(
            model.get_submodule(name), quant_type=quant_type, blocksize=blocksize,
            double_quant=double_quant, impl=impl,
        )  # fmt: skip
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = q  # same name, same place in the parent's child order
        object.__setattr__(parent, child, q)
    return names
