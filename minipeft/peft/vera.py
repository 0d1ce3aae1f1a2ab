"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024; lora_family.md).

One pair of frozen random matrices A (r, in_max), B (out_max, r) is shared by every adapted
layer (sized to the largest target, each layer slices its top-left block); each layer trains
only two vectors, b (out,) and d (r,):

    H = X·W₀ᵀ + b₀ + Λ_b·B·Λ_d·A·X̃      (row form: H = X·W₀ᵀ + b₀ + ((X̃·Aᵀ) ⊙ d)·Bᵀ ⊙ b)
                                                                                [vera.forward]
with b = 0 at init (so ΔW = 0) and d = 0.1 (HF PEFT's ``d_initial``) — no α/r scaling
(ERRATA 11: the lecture initializes both to ones, scales by α/r and uses a ∈ ℝ^k).
Trainable parameters per layer: out + r. With G = ∂L/∂H, U = X̃·Aᵀ, Z = (U ⊙ d)·Bᵀ:

    ∂L/∂b = Σₙ G ⊙ Z                                                            [vera.grad_b]
    ∂L/∂d = Σₙ ((G ⊙ b)·B) ⊙ U                                                  [vera.grad_d]
    ∂L/∂X = G·W₀ + [(((G ⊙ b)·B) ⊙ d)·A] ⊙ M/(1−p)                             [vera.grad_X]
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..autograd.tensor import Function, Tensor
from ..backend import Array
from ..nn.module import Module, Parameter
from .config import check_adapter_name
from .lora import AdapterLayer, _AdapterDict, base_layout

__all__ = ["VeraFunction", "VeraLayer", "vera_kaiming_projection", "vera_linear"]


def vera_kaiming_projection(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """U(−√3·√2/√fan_in, +…) with fan_in = shape[1] — HF PEFT's ``_kaiming_init`` for A and B."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape)


class VeraFunction(Function):
    """H = X·W₀ᵀ + b₀ + ((X̃·Aᵀ) ⊙ d)·Bᵀ ⊙ b with the closed-form backward (module docstring).

    Inputs x, w0, [bias], lambda_b (out,), lambda_d (r,); the frozen projections A (r, in)
    and B (out, r) are already sliced and passed as parameters (never differentiated).
    """

    def forward(
        self,
        x: Array,
        w0: Array,
        *rest: Array,
        proj_a: Array,
        proj_b: Array,
        mask: Array | None,
        fan_in_fan_out: bool,
        has_bias: bool,
    ) -> Array:
        bias = rest[0] if has_bias else None
        lam_b, lam_d = rest[-2], rest[-1]
        self.lead, k = x.shape[:-1], x.shape[-1]
        xs = x.reshape(-1, k)  # (N, in)
        h = xs @ w0 if fan_in_fan_out else xs @ w0.T  # X·W₀ᵀ   (N, out)
        if bias is not None:
            h = h + bias
        m = None if mask is None else mask.reshape(-1, k)
        xd = xs if m is None else xs * m  # X̃
        u = xd @ proj_a.T  # U = X̃·Aᵀ   (N, r)
        z = (u * lam_d) @ proj_b.T  # Z = (U ⊙ d)·Bᵀ   (N, out)
        h = h + z * lam_b  # H += Z ⊙ b
        self.saved = (w0, proj_a, proj_b, lam_b, lam_d, u, z, m, fan_in_fan_out, has_bias, k)
        return h.reshape(*self.lead, h.shape[-1])

    def backward(self, grad: Array) -> tuple[Array | None, ...]:
        w0, pa, pb, lam_b, lam_d, u, z, m, fifo, has_bias, k = self.saved
        g = grad.reshape(-1, grad.shape[-1])  # G (N, out)
        gbl = g * lam_b  # G ⊙ b
        gbb = gbl @ pb  # (G ⊙ b)·B   (N, r)
        i_b, i_d = (3, 4) if has_bias else (2, 3)
        gx = gbias = glb = gld = None
        if self.needs_input_grad[0]:
            gx = g @ w0.T if fifo else g @ w0  # G·W₀
            d = (gbb * lam_d) @ pa  # (((G⊙b)·B) ⊙ d)·A
            gx = (gx + (d if m is None else d * m)).reshape(*self.lead, k)
        if has_bias and self.needs_input_grad[2]:
            gbias = g.sum(axis=0)
        if self.needs_input_grad[i_b]:
            glb = (g * z).sum(axis=0)  # ∂L/∂b = Σₙ G ⊙ Z
        if self.needs_input_grad[i_d]:
            gld = (gbb * u).sum(axis=0)  # ∂L/∂d = Σₙ ((G⊙b)·B) ⊙ U
        head = [gx, None] + ([gbias] if has_bias else [])
        return (*head, glb, gld)


def vera_linear(
    x: Tensor,
    w0: Tensor,
    bias: Tensor | None,
    lambda_b: Tensor,
    lambda_d: Tensor,
    proj_a: Array,
    proj_b: Array,
    *,
    mask: Array | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """VeRA layer output with fused backward.

    [vera.forward] [vera.grad_b] [vera.grad_d] [vera.grad_X]

    ``proj_a`` (r, in) and ``proj_b`` (out, r) are the (sliced) frozen shared projections.
    """
    out_f, in_f = (w0.shape[1], w0.shape[0]) if fan_in_fan_out else w0.shape
    r = lambda_d.shape[0]
    if tuple(proj_a.shape) != (r, in_f) or tuple(proj_b.shape) != (out_f, r):
        raise ValueError(
            f"proj_a, proj_b: expected shapes {(r, in_f)} and {(out_f, r)}, "
            f"got {tuple(proj_a.shape)} and {tuple(proj_b.shape)}"
        )
    if lambda_b.shape != (out_f,):
        raise ValueError(f"lambda_b: expected shape {(out_f,)}, got {lambda_b.shape}")
    if w0.requires_grad:
        raise ValueError("w0: VeRA's base weight must be frozen (requires_grad=False)")
    head = [x, w0] + ([bias] if bias is not None else [])
    return VeraFunction.apply(
        *head,
        lambda_b,
        lambda_d,
        proj_a=proj_a,
        proj_b=proj_b,
        mask=mask,
        fan_in_fan_out=bool(fan_in_fan_out),
        has_bias=bias is not None,
    )


class VeraLayer(AdapterLayer):
    """A frozen base layer plus one VeRA adapter; names as HF PEFT (``vera_lambda_b.<name>``).

    ``shared`` is a dict {"A": (r, in_max), "B": (out_max, r)} of frozen arrays owned by the
    PEFT model and shared by all layers.
    """

    def __init__(
        self,
        base: Module,
        name: str,
        shared: dict[str, Array],
        *,
        r: int,
        d_initial: float = 0.1,
        vera_dropout: float = 0.0,
        fan_in_fan_out: bool | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        check_adapter_name(name)
        self.in_features, self.out_features, self.fan_in_fan_out = base_layout(base, fan_in_fan_out)
        a, b = shared["A"], shared["B"]
        if a.shape[0] != r or a.shape[1] < self.in_features or b.shape[0] < self.out_features:
            raise ValueError(
                f"shared: projections {tuple(a.shape)}, {tuple(b.shape)} too small for a "
                f"({self.out_features}, {self.in_features}) layer with r={r}"
            )
        if not 0.0 <= vera_dropout < 1.0:
            raise ValueError(f"vera_dropout: expected a probability in [0, 1), got {vera_dropout}")
        base.requires_grad_(False)  # the base layer is frozen: the point of PEFT
        self.base_layer = base
        object.__setattr__(self, "shared", shared)
        self.adapter_name, self.r, self.vera_dropout = name, int(r), float(vera_dropout)
        dt = base.weight.dtype
        self.vera_lambda_b = _AdapterDict()
        self.vera_lambda_d = _AdapterDict()
        lb = np.zeros(self.out_features, dt) if init_weights else np.ones(self.out_features, dt)
        setattr(self.vera_lambda_b, name, Parameter(lb))  # b = 0 at init: ΔW = 0
        setattr(self.vera_lambda_d, name, Parameter(np.full(r, d_initial, dtype=dt)))
        self.disabled = False
        self.merged = False

    @property
    def lambda_b(self) -> Parameter:
        return getattr(self.vera_lambda_b, self.adapter_name)

    @property
    def lambda_d(self) -> Parameter:
        return getattr(self.vera_lambda_d, self.adapter_name)

    def projections(self) -> tuple[Array, Array]:
        """The sliced frozen A (r, in) and B (out, r) this layer uses."""
        a = self.shared["A"][:, : self.in_features]
        b = self.shared["B"][: self.out_features, :]
        dt = self.base_layer.weight.dtype
        return a.astype(dt, copy=False), b.astype(dt, copy=False)

    def delta_weight(self) -> Array:
        """ΔW = Λ_b·B·Λ_d·A (out, in)."""
        a, b = self.projections()
        return self.lambda_b.data[:, None] * (b * self.lambda_d.data[None, :]) @ a

    def merge(self) -> None:
        if not self.merged:
            dw = self.delta_weight()
            object.__setattr__(self, "_dw", dw)
            self.base_layer.weight.data[...] += dw.T if self.fan_in_fan_out else dw
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data[...] -= self._dw.T if self.fan_in_fan_out else self._dw
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_output(x)
        if h is not None:
            return h
        mask = None
        if self.training and self.vera_dropout > 0:
            keep = backend.rng().random(x.shape) >= self.vera_dropout
            mask = keep.astype(x.dtype) / x.dtype.type(1.0 - self.vera_dropout)
        a, b = self.projections()
        base = self.base_layer
        return vera_linear(
            x,
            base.weight,
            getattr(base, "bias", None),
            self.lambda_b,
            self.lambda_d,
            a,
            b,
            mask=mask,
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"
