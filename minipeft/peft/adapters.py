"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) for GPT-2 and BERT.

An adapter is a small residual MLP inserted after a sub-layer's output projection:

    Adapter(h) = h + W_up·f(W_down·h + b_down) + b_up        W_down (r, C), W_up (C, r)

with a bottleneck r ≤ C and f = ReLU (or the tanh GELU). With W_up = 0 and b_up = 0 the
adapter starts as the identity, so the adapted network starts as the pretrained one
(Houlsby et al. use a near-identity init with small weights; ``init="houlsby"``).

Placements (derivations/adapters_prompts.md#adapters.forward):

    Houlsby   two per layer: after the attention output projection and after the
              feed-forward output projection, before each residual add.
    Pfeiffer  one per layer: after the feed-forward output projection only (the LoRA
              paper's AdapterL/AdapterP place one adapter after the MLP; AdapterHub's
              "pfeiffer" config also rewires its LayerNorms, which minipeft does not do).

    GPT-2:  transformer.h.{i}.attn.c_proj (Houlsby), transformer.h.{i}.mlp.c_proj (both)
    BERT:   encoder.layer.{i}.attention.output.dense (Houlsby),
            encoder.layer.{i}.output.dense (both)

The wrapped projection keeps HF PEFT's naming (``….base_layer`` + ``….adapter``).
Parameter count per adapter: 2·C·r + r + C, the LoRA paper's AdapterH/AdapterL term
(``counts.adapter_params``). The backward is autograd's composition of matmul, add and f;
``adapter_grads`` is the closed form of the derivation, checked against it and against
float64 finite differences.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Tensor
from ..nn.module import Module, Parameter

__all__ = [
    "ADAPTER_KINDS",
    "AdaptedLayer",
    "BottleneckAdapter",
    "adapter",
    "adapter_grads",
    "adapter_targets",
    "add_adapters",
]

ADAPTER_KINDS = ("houlsby", "pfeiffer")
_ACTS = ("relu", "gelu")


def _act(name: str, z: Tensor) -> Tensor:
    return ops.relu(z) if name == "relu" else ops.gelu(z)


def adapter(
    h: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, act: str = "relu"
) -> Tensor:
    """y = h + W_up·f(W_down·h + b_down) + b_up, rows of h (..., C).   [adapters.forward]

    Row-major: Z = H·W_downᵀ + b_down (..., r), Y = H + f(Z)·W_upᵀ + b_up (..., C).
    """
    if act not in _ACTS:
        raise ValueError(f"act: expected one of {_ACTS}, got {act!r}")
    # Z = H·W_downᵀ + b_down
    z = ops.matmul(h, ops.transpose(w_down, (1, 0))) + b_down  # (..., r)
    # Y = H + f(Z)·W_upᵀ + b_up
    return h + (ops.matmul(_act(act, z), ops.transpose(w_up, (1, 0))) + b_up)  # (..., C)


def _act_and_slope(z: np.ndarray, act: str) -> tuple[np.ndarray, np.ndarray]:
    """f(z) and f'(z) in NumPy (ReLU, or the tanh GELU of ops.gelu)."""
    if act == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(z.dtype)
    c = math.sqrt(2.0 / math.pi)
    zc = np.clip(z, -20.0, 20.0)  # u(±20) ≈ ±301: σ is exactly 0 or 1 there, and z³ stays finite
    u = c * (zc + 0.044715 * zc**3)
    # ½(1 + tanh u) = σ(2u), evaluated without the cancellation of 1 + tanh u ≈ 0 in the left
    # tail: σ(2u) = 1/(1 + e) for u ≥ 0 and e/(1 + e) for u < 0, e = e^{−|2u|}
    e = np.exp(-np.abs(2 * u))
    s = np.where(u >= 0, 1 / (1 + e), e / (1 + e))
    # f = z·σ(2u);  f' = σ(2u) + 2z·σ(2u)(1 − σ(2u))·c(1 + 3·0.044715 z²)
    return z * s, s + 2 * z * (s * (1 - s)) * c * (1 + 3 * 0.044715 * zc**2)


def adapter_grads(
    h: np.ndarray,
    w_down: np.ndarray,
    b_down: np.ndarray,
    w_up: np.ndarray,
    b_up: np.ndarray,
    g: np.ndarray,
    act: str = "relu",
) -> dict[str, np.ndarray]:
    """Closed-form VJP of ``adapter`` for rows H (N, C) and upstream G = ∂L/∂Y (N, C).

    [adapters.grad_W_up]   ∂L/∂W_up = Gᵀ·A,  ∂L/∂b_up = Σₙ Gₙ,  A = f(Z)
    [adapters.grad_W_down] ∂L/∂W_down = Dᵀ·H, ∂L/∂b_down = Σₙ Dₙ, D = (G·W_up) ⊙ f'(Z)
                           ∂L/∂H = G + D·W_down
    """
    if act not in _ACTS:
        raise ValueError(f"act: expected one of {_ACTS}, got {act!r}")
    # Z = H·W_downᵀ + b_down
    z = h @ w_down.T + b_down  # (N, r)
    a, slope = _act_and_slope(z, act)
    # D = (G·W_up) ⊙ f'(Z)
    d = (g @ w_up) * slope  # (N, r)
    return {
        "w_up": g.T @ a,  # Gᵀ·A (C, r)
        "b_up": g.sum(axis=0),  # Σₙ Gₙ (C,)
        "w_down": d.T @ h,  # Dᵀ·H (r, C)
        "b_down": d.sum(axis=0),  # Σₙ Dₙ (r,)
        "h": g + d @ w_down,  # G + D·W_down (N, C)
    }


class BottleneckAdapter(Module):
    """Adapter(h) = h + W_up·f(W_down·h + b_down) + b_up with ``down``/``up`` parameters.

    init: "zeros" (default) — W_down ~ U(±1/√C) as a Linear, W_up = 0, biases 0: the exact
    identity at step 0. "houlsby" — every weight ~ N(0, 10⁻²), biases 0 (Houlsby et al.,
    §2.1: near-identity, not exact).
    """

    def __init__(
        self, hidden_size: int, bottleneck: int, act: str = "relu", init: str = "zeros"
    ) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("bottleneck", bottleneck)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if bottleneck > hidden_size:
            raise ValueError(
                f"bottleneck: expected at most the hidden size {hidden_size} (a bottleneck "
                f"compresses), got {bottleneck}"
            )
        if act not in _ACTS:
            raise ValueError(f"act: expected one of {_ACTS}, got {act!r}")
        if init not in ("zeros", "houlsby"):
            raise ValueError(f"init: expected 'zeros' or 'houlsby', got {init!r}")
        self.hidden_size, self.bottleneck, self.act, self.init = hidden_size, bottleneck, act, init
        dt, rng = backend.default_dtype(), backend.rng()
        if init == "zeros":
            bound = 1.0 / math.sqrt(hidden_size)
            w_down = rng.uniform(-bound, bound, (bottleneck, hidden_size))
            w_up = np.zeros((hidden_size, bottleneck))
        else:
            w_down = rng.normal(0.0, 1e-2, (bottleneck, hidden_size))
            w_up = rng.normal(0.0, 1e-2, (hidden_size, bottleneck))
        self.down_weight = Parameter(w_down.astype(dt))  # (r, C)
        self.down_bias = Parameter(np.zeros(bottleneck, dtype=dt))  # (r,)
        self.up_weight = Parameter(w_up.astype(dt))  # (C, r)
        self.up_bias = Parameter(np.zeros(hidden_size, dtype=dt))  # (C,)

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[-1] != self.hidden_size:
            raise ValueError(
                f"h: expected last dimension {self.hidden_size} (hidden_size), got {h.shape}"
            )
        return adapter(h, self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.act)

    def extra_repr(self) -> str:
        return f"C={self.hidden_size}, r={self.bottleneck}, act={self.act}, init={self.init}"


class AdaptedLayer(Module):
    """y = Adapter(base_layer(x)): a frozen projection followed by its adapter."""

    def __init__(self, base_layer: Module, adapter_module: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter_module

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base_layer(x))


def _model_kind(model: Module) -> str:
    from ..models.bert import BertModel
    from ..models.gpt2 import GPT2

    if isinstance(model, GPT2):
        return "gpt2"
    if isinstance(model, BertModel):
        return "bert"
    raise TypeError(f"model: expected a minipeft GPT2 or BertModel, got {type(model).__name__}")


def adapter_targets(model: Module, kind: str) -> list[str]:
    """The names of the output projections that get an adapter (see the module docstring)."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind: expected one of {ADAPTER_KINDS}, got {kind!r}")
    if _model_kind(model) == "gpt2":
        n, attn, ffn = (
            model.config.n_layer,
            "transformer.h.{}.attn.c_proj",
            "transformer.h.{}.mlp.c_proj",
        )
    else:
        n = model.config.num_hidden_layers
        attn, ffn = "encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense"
    out = []
    for i in range(n):
        if kind == "houlsby":
            out.append(attn.format(i))
        out.append(ffn.format(i))
    return out


def add_adapters(
    model: Module,
    kind: str = "houlsby",
    bottleneck: int = 16,
    *,
    act: str = "relu",
    init: str = "zeros",
    train_layernorm: bool = False,
) -> int:
    """Freeze ``model`` and insert bottleneck adapters in place; return the trainable count.

    Count: L̂_Adpt·(2·C·r + r + C) (+ 2·L̂_LN·C with ``train_layernorm``), L̂_Adpt = 2L
    (Houlsby) or L (Pfeiffer), the LoRA paper's AdapterH/AdapterL formula.   [adapters.count]

    Houlsby: 2 adapters per layer; Pfeiffer: 1. With ``train_layernorm`` the layers'
    LayerNorms (not the embeddings' or the final one) are trained too, as in Houlsby et
    al. and the LoRA paper's AdapterH count 2·L̂_LN·d_model.
    """
    hidden = model.config.n_embd if _model_kind(model) == "gpt2" else model.config.hidden_size
    targets = adapter_targets(model, kind)
    # validate before touching the model
    BottleneckAdapter(hidden, bottleneck, act, init)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        if isinstance(base, AdaptedLayer):
            raise ValueError(f"model: {name} already has an adapter")
        setattr(parent, attr, AdaptedLayer(base, BottleneckAdapter(hidden, bottleneck, act, init)))
    if train_layernorm:
        for name, p in model.named_parameters():
            in_layer = name.startswith(("transformer.h.", "encoder.layer."))
            if in_layer and ("ln_" in name or "LayerNorm" in name):
                p.requires_grad_(True)
    return sum(p.size for p in model.parameters() if p.requires_grad)
