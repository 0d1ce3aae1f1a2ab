"""LoRA: a frozen weight plus a trainable low-rank update (derivations/lora.md).

For a frozen base layer with weight W₀ (out, in) and a batch X (N, in), each active adapter
adds a rank-r product, scaled by s = α/r (or α/√r with rsLoRA):

    H = X·W₀ᵀ + b + s·(X·Aᵀ)·Bᵀ          A (r, in), B (out, r)            [lora.forward]

The backward is written in closed form, as ONE Function (``LoraFunction``). With the upstream
gradient G = ∂L/∂H (N, out):

    ∂L/∂B = s·Gᵀ·(X·Aᵀ)                 (out, r)                          [lora.grad_B]
    ∂L/∂A = s·(G·B)ᵀ·X                  (r, in)                           [lora.grad_A]
    ∂L/∂X = G·W₀ + s·(G·B)·A            (N, in)                           [lora.grad_X]

and ∂L/∂W₀ = Gᵀ·X, an (out, in) matrix as large as the layer, is never formed while W₀ is
frozen — that is where LoRA saves memory and time. GPT-2's Conv1D stores its weight
transposed, (in, out), and computes X·W; ``fan_in_fan_out=True`` handles that layout, as in
HF PEFT. Dropout acts on the LoRA branch only: the branch sees X̃ = X ⊙ M/(1−p).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Function, Tensor, no_grad
from ..backend import Array
from ..nn.module import Module, Parameter
from .config import check_adapter_name

__all__ = [
    "LoraFunction",
    "LoraLayer",
    "lora_linear",
    "lora_scaling",
    "loraplus_param_groups",
    "olora_init",
    "pissa_init",
]


# ------------------------------------------------------------------------------ scaling
def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = α/r (Hu et al., 2021), or s = α/√r with rsLoRA (Kalajdzievski, 2023)."""
    if not isinstance(r, int | np.integer) or r <= 0:
        raise ValueError(f"r: expected a positive integer rank, got {r!r}")
    return float(alpha) / math.sqrt(r) if use_rslora else float(alpha) / r


# ------------------------------------------------------------------------------ the branch
# One LoRA branch, shared by every fused LoRA Function: ``LoraFunction`` below (float W₀) and
# ``Linear4bitFunction`` (minipeft.quant.qlora: Ŵ dequantized from 4 bits). Each Function only
# says where the base weight comes from; the layout, the branch and its backward are these.
def base_matmul(xs: Array, w: Array, fan_in_fan_out: bool) -> Array:
    """X·Wᵀ (Linear, W (out, in)) or X·W (Conv1D, W stored (in, out)): a fresh (N, out)."""
    return xs @ w if fan_in_fan_out else xs @ w.T


def base_grad_x(g: Array, w: Array, fan_in_fan_out: bool) -> Array:
    """G·W (Linear) or G·Wᵀ (Conv1D): the base's part of ∂L/∂X, a fresh (N, in)."""
    return g @ w.T if fan_in_fan_out else g @ w


def lora_branch_forward(
    h: Array,
    xs: Array,
    pairs: Sequence[Array],
    scales: Sequence[float],
    masks: Sequence[Array | None],
    needs_grad: Sequence[bool],
) -> list[tuple[Array, Array, Array | None, Array, Array | None]]:
    """H += Σᵢ sᵢ·(X̃ᵢ·Aᵢᵀ)·Bᵢᵀ in place; return what ``lora_branch_backward`` needs.

    ``h`` (N, out) holds the base output, ``xs`` the input X (N, in), ``pairs`` the flat
    [A₁, B₁, A₂, B₂, …], ``masks`` each adapter's dropout multiplier M/(1−p) (shaped like
    the input, or None) and ``needs_grad`` whether A₁, B₁, A₂, … need a gradient. Saved per
    adapter: A, B, X̃ (only when ∂L/∂A is needed), U = X̃·Aᵀ (N, r) and the flat mask.
    """
    k = xs.shape[-1]
    saved = []
    for i, s in enumerate(scales):
        a, b = pairs[2 * i], pairs[2 * i + 1]
        m = masks[i]
        xd = xs if m is None else xs * m.reshape(-1, k)  # X̃ = X ⊙ M/(1−p)   (N, in)
        u = xd @ a.T  # U = X̃·Aᵀ   (N, r)
        h += (s * u) @ b.T  # H += s·U·Bᵀ  (s applied to the small (N, r) factor)
        # ∂L/∂A needs X̃; ∂L/∂B needs U; ∂L/∂X needs A, B (and M)
        xd_kept = xd if needs_grad[2 * i] else None
        saved.append((a, b, xd_kept, u, None if m is None else m.reshape(-1, k)))
    return saved


def lora_branch_backward(
    g: Array,
    gx: Array | None,
    scales: Sequence[float],
    saved: Sequence[tuple[Array, Array, Array | None, Array, Array | None]],
    needs_grad: Sequence[bool],
) -> list[Array | None]:
    """[∂L/∂A₁, ∂L/∂B₁, ∂L/∂A₂, …] of the branch; adds its part of ∂L/∂X into ``gx``.

    ∂L/∂A = s·(G·B)ᵀ·X̃,  ∂L/∂B = s·Gᵀ·(X̃·Aᵀ),  ∂L/∂X += s·(G·B)·A ⊙ M/(1−p) (in place,
    when ``gx`` is not None). The base weight is not an argument: it is never read here.
    """
    pair_grads: list[Array | None] = []
    for i, (s, (a, b, xd, u, m)) in enumerate(zip(scales, saved)):
        need_a, need_b = needs_grad[2 * i], needs_grad[2 * i + 1]
        gb_ = g @ b if (need_a or gx is not None) else None  # G·B   (N, r)
        ga = s * (gb_.T @ xd) if need_a else None  # ∂L/∂A = s·(G·B)ᵀ·X̃   (r, in)
        gbm = s * (g.T @ u) if need_b else None  # ∂L/∂B = s·Gᵀ·(X̃·Aᵀ)   (out, r)
        if gx is not None:
            d = (s * gb_) @ a  # s·(G·B)·A   (N, in); s applied to the small (N, r) factor
            if m is not None:
                d *= m  # ⊙ M/(1−p)
            gx += d
        pair_grads += [ga, gbm]
    return pair_grads


class FusedLoraFunction(Function):
    """What every fused LoRA Function shares: H = X·Wᵀ + b + the branch, and ∂L/∂X, ∂L/∂Aᵢ, ∂L/∂Bᵢ.

    A subclass only says where the float base weight W comes from (``LoraFunction``: the
    input W₀; ``minipeft.peft.qlora.Linear4bitFunction``: Ŵ dequantized from 4 bits) and
    adds the gradients of its own head inputs (W₀, b). Its inputs end with the pairs
    ``A₁, B₁, A₂, B₂, …``.
    """

    def lora_forward(
        self,
        x: Array,
        w: Array,
        bias: Array | None,
        pairs: Sequence[Array],
        scales: Sequence[float],
        masks: Sequence[Array | None],
        fan_in_fan_out: bool,
    ) -> Array:
        """H = X·Wᵀ + b + Σᵢ sᵢ·(X̃ᵢ·Aᵢᵀ)·Bᵢᵀ, (..., out); keeps X (N, in) as ``self.xs``."""
        self.lead, k = x.shape[:-1], x.shape[-1]
        xs = x.reshape(-1, k)  # (N, in)
        self.fan_in_fan_out, self.has_bias, self.scales = fan_in_fan_out, bias is not None, scales
        h = base_matmul(xs, w, fan_in_fan_out)  # H = X·Wᵀ   (N, out)
        if bias is not None:
            h += bias  # + b (in place: h is a fresh product)
        self.pair_needs = self.needs_input_grad[len(self.needs_input_grad) - len(pairs) :]
        self.saved = lora_branch_forward(h, xs, pairs, scales, masks, self.pair_needs)
        self.xs = xs  # a subclass keeps it only if it needs it (drop it before returning)
        return h.reshape(*self.lead, h.shape[-1])  # (..., out)

    def lora_backward(self, g: Array, w: Array | None) -> tuple[Array | None, list[Array | None]]:
        """(∂L/∂X (..., in) or None when ``w`` is None, [∂L/∂A₁, ∂L/∂B₁, …]); G is (N, out)."""
        # ∂L/∂X = G·W (+ Σ sᵢ·(G·Bᵢ)·Aᵢ in the branch)
        gx = None if w is None else base_grad_x(g, w, self.fan_in_fan_out)  # (N, in)
        pair_grads = lora_branch_backward(g, gx, self.scales, self.saved, self.pair_needs)
        if gx is not None:
            gx = gx.reshape(*self.lead, gx.shape[-1])  # (..., in)
        return gx, pair_grads


# ------------------------------------------------------------------------------ the Function
class LoraFunction(FusedLoraFunction):
    """H = X·W₀ᵀ + b + Σᵢ sᵢ·(X̃ᵢ·Aᵢᵀ)·Bᵢᵀ and its closed-form backward, in one Function.

    Inputs: ``x`` (..., in), ``w0`` (out, in) — or (in, out) when ``fan_in_fan_out`` —,
    optionally ``bias`` (out,) when ``has_bias``, then pairs ``A₁, B₁, A₂, B₂, …``.
    ``scales`` holds sᵢ and ``masks`` the dropout multipliers Mᵢ/(1−p) (or None) of each pair.
    The LoRA branch is ``lora_branch_forward``/``lora_branch_backward``.
    """

    def forward(
        self,
        x: Array,
        w0: Array,
        *rest: Array,
        scales: Sequence[float],
        masks: Sequence[Array | None],
        fan_in_fan_out: bool,
        has_bias: bool,
    ) -> Array:
        bias = rest[0] if has_bias else None
        pairs = rest[1:] if has_bias else rest
        h = self.lora_forward(x, w0, bias, pairs, scales, masks, fan_in_fan_out)
        self.w0 = w0 if self.needs_input_grad[0] else None  # only ∂L/∂X needs W₀
        if not self.needs_input_grad[1]:
            self.xs = None  # only ∂L/∂W₀ (full fine-tuning) needs X
        return h

    def backward(self, grad: Array) -> tuple[Array | None, ...]:
        g = grad.reshape(-1, grad.shape[-1])  # G (N, out)
        gw0 = gbias = None
        if self.needs_input_grad[1]:
            # ∂L/∂W₀ = Gᵀ·X — only when W₀ is NOT frozen (full fine-tuning); LoRA never gets here
            gw0 = self.xs.T @ g if self.fan_in_fan_out else g.T @ self.xs
        if self.has_bias and self.needs_input_grad[2]:
            gbias = g.sum(axis=0)  # ∂L/∂b = Σₙ Gₙ
        gx, pair_grads = self.lora_backward(g, self.w0)  # W₀ is None unless X needs ∂L/∂X
        head: list[Array | None] = [gx, gw0] + ([gbias] if self.has_bias else [])
        return tuple(head + pair_grads)


def check_adapters(
    x: Tensor,
    in_f: int,
    out_f: int,
    bias: Tensor | None,
    adapters: Sequence[tuple[Tensor, Tensor, float]],
    masks: Sequence[Array | None] | None,
) -> tuple[list[Tensor], list[Array | None]]:
    """Validate a LoRA call's shapes; return the flat [A₁, B₁, A₂, B₂, …] and one mask each.

    Shared by every fused LoRA Function (float base here, 4-bit base in ``quant.qlora``).
    """
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected last dimension {in_f} (in_features), got shape {x.shape}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias: expected shape {(out_f,)}, got {bias.shape}")
    masks = list(masks) if masks is not None else [None] * len(adapters)
    if len(masks) != len(adapters):
        raise ValueError(f"masks: expected {len(adapters)} entries, got {len(masks)}")
    flat: list[Tensor] = []
    for i, (a, b, _) in enumerate(adapters):
        if a.ndim != 2 or a.shape[1] != in_f:
            raise ValueError(f"adapters[{i}].A: expected shape (r, {in_f}), got {a.shape}")
        if b.ndim != 2 or b.shape != (out_f, a.shape[0]):
            raise ValueError(
                f"adapters[{i}].B: expected shape ({out_f}, {a.shape[0]}), got {b.shape}"
            )
        flat += [a, b]
    for i, m in enumerate(masks):
        if m is not None and tuple(m.shape) != x.shape:
            raise ValueError(f"masks[{i}]: expected shape {x.shape}, got {tuple(m.shape)}")
    return flat, masks


def lora_linear(
    x: Tensor,
    w0: Tensor,
    bias: Tensor | None,
    adapters: Sequence[tuple[Tensor, Tensor, float]],
    *,
    masks: Sequence[Array | None] | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """LoRA forward with its fused closed-form backward.

    [lora.forward]  H = X·W₀ᵀ + b + Σ sᵢ·(X̃·Aᵢᵀ)·Bᵢᵀ
    [lora.grad_A]   ∂L/∂A = s·(G·B)ᵀ·X̃
    [lora.grad_B]   ∂L/∂B = s·Gᵀ·(X̃·Aᵀ)
    [lora.grad_X]   ∂L/∂X = G·W₀ + s·(G·B)·A   (⊙ the dropout multiplier on the second term)

    ``adapters`` is a list of (A (r, in), B (out, r), s). ``w0`` is (out, in), or (in, out)
    with ``fan_in_fan_out`` (GPT-2's Conv1D). ``masks`` gives each adapter's dropout
    multiplier M/(1−p), shaped like ``x`` (None: no dropout).
    """
    if not isinstance(x, Tensor) or not isinstance(w0, Tensor):
        raise TypeError("x, w0: expected Tensors")
    out_f, in_f = (w0.shape[1], w0.shape[0]) if fan_in_fan_out else w0.shape
    flat, masks = check_adapters(x, in_f, out_f, bias, adapters, masks)
    head = [x, w0] + ([bias] if bias is not None else [])
    return LoraFunction.apply(
        *head,
        *flat,
        scales=tuple(float(s) for s in (ad[2] for ad in adapters)),
        masks=tuple(masks),
        fan_in_fan_out=bool(fan_in_fan_out),
        has_bias=bias is not None,
    )


# ------------------------------------------------------------------------------ inits
def _kaiming_uniform(shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """PyTorch's kaiming_uniform_(a=√5) on a (r, in) matrix: U(−1/√in, 1/√in)."""
    bound = math.sqrt(6.0 / ((1 + 5.0) * shape[1]))
    return backend.rng().uniform(-bound, bound, size=shape).astype(dtype)


def pissa_init(w: np.ndarray, r: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PiSSA (Meng et al., 2024): put the top-r singular part of W in the adapter.

    [lora.pissa_init]

    W = U·S·Vᵀ (out, in).  A = diag(√(S_r/s))·V_rᵀ,  B = U_r·diag(√(S_r/s)), so that
    s·B·A = U_r·S_r·V_rᵀ, and the residual W₀' = W − s·B·A keeps the other singular values:
    W₀' + s·B·A = W exactly at initialization. Returns (W₀', A, B) in W's dtype.
    """
    w64 = np.asarray(w, dtype=np.float64)
    if r > min(w64.shape):
        raise ValueError(f"r: PiSSA needs r ≤ min(out, in) = {min(w64.shape)}, got {r}")
    u, sv, vt = np.linalg.svd(w64, full_matrices=False)
    root = np.sqrt(sv[:r] / scale)  # √(S_r / s)
    a = root[:, None] * vt[:r]  # A = diag(√(S_r/s))·V_rᵀ   (r, in)
    b = u[:, :r] * root[None, :]  # B = U_r·diag(√(S_r/s))    (out, r)
    w_res = w64 - scale * (b @ a)  # W₀' = W − s·B·A
    return w_res.astype(w.dtype), a.astype(w.dtype), b.astype(w.dtype)


def olora_init(w: np.ndarray, r: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLoRA (Büyükakyüz, 2024): W = Q·R; B = Q[:, :r], A = R[:r]; W₀' = W − s·B·A.

    [lora.olora_init]

    B has orthonormal columns; W₀' + s·B·A = W exactly at initialization (as in HF PEFT, the
    QR factors are not rescaled by s, so the adapter carries s·Q_r·R_r of W).
    """
    w64 = np.asarray(w, dtype=np.float64)
    if r > min(w64.shape):
        raise ValueError(f"r: OLoRA needs r ≤ min(out, in) = {min(w64.shape)}, got {r}")
    q, rr = np.linalg.qr(w64)  # W = Q·R, Q (out, min), R (min, in)
    b, a = q[:, :r], rr[:r]  # B = Q_r (out, r), A = R_r (r, in)
    w_res = w64 - scale * (b @ a)  # W₀' = W − s·B·A
    return w_res.astype(w.dtype), a.astype(w.dtype), b.astype(w.dtype)


INIT_CHOICES = ("true", "kaiming", "gaussian", "lecture", "pissa", "olora", "false")


# ------------------------------------------------------------------------------ the layer
class _Holder(Module):
    """A module holding one ``weight`` Parameter (so names read ``lora_A.default.weight``)."""

    def __init__(self, weight: Parameter) -> None:
        super().__init__()
        self.weight = weight


class _AdapterDict(Module):
    """Named children, one per adapter, like ``nn.ModuleDict`` (``lora_A.<adapter>``)."""

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    def keys(self) -> list[str]:
        return list(self._modules)

    def __delitem__(self, name: str) -> None:
        delattr(self, name)


class AdapterLayer(Module):
    """The switches every adapter-carrying layer shares (LoRA, IA3, VeRA, AdaLoRA).

    A subclass holds ``base_layer``, a ``disabled`` flag, a ``merged`` state and
    ``unmerge()``. As in HF PEFT, running with the adapters switched off unmerges them first.
    """

    disabled: bool

    def enable_adapters(self, enabled: bool = True) -> None:
        """Switch the adapters on (True) or off (False: the base layer alone)."""
        self.disabled = not enabled

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """``with layer.disable_adapters(): ...`` runs the base layer alone."""
        old = self.disabled
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = old

    def base_output(self, x: Tensor) -> Tensor | None:
        """The base layer's output when the adapters must not run (off, or merged into W₀)."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        return None


def base_layout(
    base: Module, fan_in_fan_out: bool | None = None, *, allow_4bit: bool = False
) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a Linear (out, in) or Conv1D (in, out).

    Like HF PEFT, a Conv1D base forces ``fan_in_fan_out=True`` (with a warning when the
    caller asked for False) and a Linear base forces False.
    """
    w = getattr(base, "weight", None)
    is_4bit = getattr(base, "is_4bit", False)  # minipeft.quant.qlora.Linear4bit (QLoRA)
    if is_4bit and not allow_4bit:
        raise TypeError(
            "base: a 4-bit layer (Linear4bit) can carry LoRA adapters only (QLoRA); this "
            "adapter needs a float weight"
        )
    if not (isinstance(w, Tensor) or is_4bit) or w.ndim != 2:
        raise TypeError(
            "base: expected a layer with a 2-D weight (Linear or Conv1D), "
            f"got {type(base).__name__}"
        )
    is_conv1d = type(base).__name__ == "Conv1D" or (is_4bit and base.fan_in_fan_out)
    if fan_in_fan_out is not None and bool(fan_in_fan_out) != is_conv1d:
        warnings.warn(
            f"fan_in_fan_out={fan_in_fan_out} does not match the base layer "
            f"{type(base).__name__}; using fan_in_fan_out={is_conv1d}",
            stacklevel=3,
        )
    if is_conv1d:
        return int(w.shape[0]), int(w.shape[1]), True
    return int(w.shape[1]), int(w.shape[0]), False


class LoraLayer(AdapterLayer):
    """A frozen base layer (``base_layer``) with named LoRA adapters.

    Parameter names follow HF PEFT: ``base_layer.weight``, ``lora_A.<name>.weight`` (r, in),
    ``lora_B.<name>.weight`` (out, r), ``lora_magnitude_vector.<name>.weight`` (DoRA).
    Several adapters can live side by side; ``set_adapter`` chooses the active one(s),
    ``disable_adapters()`` runs the base layer alone, ``merge``/``unmerge`` fold the
    active adapters into W₀ and back.
    """

    def __init__(self, base: Module, fan_in_fan_out: bool | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = base_layout(
            base, fan_in_fan_out, allow_4bit=True
        )
        base.requires_grad_(False)  # the base layer is frozen: the point of PEFT
        self.base_layer = base
        self.lora_A = _AdapterDict()
        self.lora_B = _AdapterDict()
        self.lora_magnitude_vector = _AdapterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ---------------------------------------------------------------- adapters
    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        activate: bool = True,
    ) -> None:
        """Create adapter ``name``: A (r, in), B (out, r) initialized per ``init_lora_weights``.

        ``True``/"kaiming": A Kaiming-uniform, B = 0 (HF PEFT and loralib);
        "gaussian": A ~ N(0, 1/r²), B = 0 (HF PEFT); "lecture": A = 0, B Kaiming-uniform
        (the lecture's quick start — shown only to compare first-step gradients, ERRATA 6);
        "pissa"/"olora": the principal part of W₀ moves into the adapter (W₀ is modified);
        ``False``: A and B random (an identity-breaking init for tests).
        """
        check_adapter_name(name)
        if name in self.r:
            raise ValueError(f"name: adapter {name!r} already exists on this layer")
        if not isinstance(r, int | np.integer) or r <= 0:
            raise ValueError(f"r: expected a positive integer rank, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout}")
        init = str(init_lora_weights).lower()
        if init not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights: expected one of {INIT_CHOICES}, got {init!r}")
        if init in ("pissa", "olora") and self.merged_adapters:
            raise ValueError("init_lora_weights: cannot PiSSA/OLoRA-initialize a merged layer")
        if use_dora or init in ("pissa", "olora"):
            self._w0_out_in()  # needs the float W₀: a 4-bit base raises here, before any change
        r = int(r)
        s = lora_scaling(r, lora_alpha, use_rslora)
        w0 = self.base_layer.weight
        dt = w0.dtype
        shape_a, shape_b = (r, self.in_features), (self.out_features, r)
        if init in ("true", "kaiming"):
            a, b = _kaiming_uniform(shape_a, dt), np.zeros(shape_b, dt)
        elif init == "gaussian":
            a = (backend.rng().standard_normal(shape_a) / r).astype(dt)  # N(0, (1/r)²)
            b = np.zeros(shape_b, dt)
        elif init == "lecture":
            a = np.zeros(shape_a, dt)
            b = backend.rng().uniform(-1, 1, size=shape_b).astype(dt) / math.sqrt(r)
        elif init == "false":
            a, b = _kaiming_uniform(shape_a, dt), _kaiming_uniform((shape_b[0], r), dt)
        else:
            w_oi = self._w0_out_in()
            fn = pissa_init if init == "pissa" else olora_init
            w_res, a, b = fn(backend.to_numpy(w_oi), r, s)
            with no_grad():
                w_res = backend.like(w_res, w0.data)  # computed on the host, moved once
                w0.data[...] = w_res.T if self.fan_in_fan_out else w_res
        # initial values are drawn on the host (one seeded generator for both backends) and
        # placed beside the base weight, which may live on the device
        # (a 4-bit W₀ has no .data: ask where it lives)
        where = w0.placement()
        a, b = backend.to_device(a, where), backend.to_device(b, where)
        self.lora_A[name] = _Holder(Parameter(a))
        self.lora_B[name] = _Holder(Parameter(b))
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, float(lora_alpha), s
        self.lora_dropout[name] = float(lora_dropout)
        self.use_dora[name] = bool(use_dora)
        if use_dora:
            from .dora import dora_weight_norm

            n = dora_weight_norm(self._w0_out_in(), b, a, s)  # m₀ = ‖W₀ + s·B·A‖ per row
            self.lora_magnitude_vector[name] = _Holder(Parameter(n.astype(dt)))
        if activate:
            self.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise ValueError(f"name: adapter {name!r} is merged; unmerge it first")
        for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_dora):
            d.pop(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _check_name(self, name: str) -> None:
        if name not in self.r:
            raise KeyError(f"adapter: no adapter named {name!r}; have {sorted(self.r)}")

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapter(s); only they train (others are frozen).

        A merged layer runs its base weight alone, so if other adapters are merged than
        the ones asked for, they are unmerged first, with a warning (HF PEFT's rule).
        """
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._check_name(n)
        if self.merged and set(self.merged_adapters) != set(names):
            warnings.warn(
                f"set_adapter: adapters {self.merged_adapters} are merged into this layer; "
                f"unmerging them first, as HF PEFT does",
                UserWarning,
                stacklevel=2,
            )
            self.unmerge()
        self.active_adapters = names
        for n in self.r:
            flag = n in names
            self.lora_A[n].weight.requires_grad_(flag)
            self.lora_B[n].weight.requires_grad_(flag)
            if n in self.lora_magnitude_vector:
                self.lora_magnitude_vector[n].weight.requires_grad_(flag)

    # ---------------------------------------------------------------- weights
    def _w0_out_in(self) -> Array:
        """W₀ in the (out, in) layout (a view)."""
        w = self.base_layer.weight.data
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> Array:
        """ΔW = s·B·A in the (out, in) layout (DoRA: the merged weight minus W₀)."""
        self._check_name(name)
        a, b, s = self.lora_A[name].weight.data, self.lora_B[name].weight.data, self.scaling[name]
        if self.use_dora[name]:
            from .dora import dora_merged_weight

            w0 = self._w0_out_in()
            m = self.lora_magnitude_vector[name].weight.data
            return dora_merged_weight(w0, b, a, m, s) - w0
        return s * (b @ a)  # ΔW = s·B·A   [lora.merge]

    def merge(self, names: Sequence[str] | None = None) -> None:
        """W₀ ← W₀ + s·B·A for each (active) adapter, so inference runs the base layer alone.

        [lora.merge]  x·(W₀ + s·B·A)ᵀ = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ.  The ΔW of each merged adapter
        is kept, so ``unmerge`` subtracts exactly what was added.
        """
        names = list(self.active_adapters if names is None else names)
        w = self.base_layer.weight.data
        for n in names:
            if n in self.merged_adapters:
                continue
            dw = self.delta_weight(n).astype(w.dtype)
            if not hasattr(self, "_merged_delta"):
                object.__setattr__(self, "_merged_delta", {})
            self._merged_delta[n] = dw
            w += dw.T if self.fan_in_fan_out else dw
            self.merged_adapters.append(n)

    def unmerge(self) -> None:
        """Undo ``merge``: W₀ ← W₀ − ΔW for every merged adapter, last merged first."""
        w = self.base_layer.weight.data
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            dw = self._merged_delta.pop(n)
            w -= dw.T if self.fan_in_fan_out else dw

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ---------------------------------------------------------------- forward
    def _mask(self, p: float, x: Tensor) -> Array | None:
        if not self.training or p == 0.0:
            return None
        xp = backend.xp_of(x.data)
        keep = backend.rng().random(x.shape) >= p
        return xp.asarray(keep, dtype=x.dtype) * x.dtype.type(1.0 / (1.0 - p))  # M/(1−p)

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_output(x)
        if h is not None:
            return h
        base = self.base_layer
        plain, masks, doras = [], [], []
        for n in self.active_adapters:
            a, b, s = self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]
            mask = self._mask(self.lora_dropout[n], x)
            if self.use_dora[n]:
                doras.append((n, a, b, s, mask))
            else:
                plain.append((a, b, s))
                masks.append(mask)
        bias = getattr(base, "bias", None)
        if getattr(base, "is_4bit", False):  # QLoRA: 4-bit base dequantized on the fly
            h = base.lora_forward(x, plain, masks)
        else:
            h = lora_linear(
                x, base.weight, bias, plain, masks=masks, fan_in_fan_out=self.fan_in_fan_out
            )
        if doras:
            from .dora import dora_delta

            for n, a, b, s, mask in doras:
                m = self.lora_magnitude_vector[n].weight
                h = h + dora_delta(
                    x, base.weight, m, a, b, s, mask=mask, fan_in_fan_out=self.fan_in_fan_out
                )
        return h

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}: r={r}, s={self.scaling[n]:g}" for n, r in self.r.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ads}]"


def loraplus_param_groups(
    model: Module, lr: float, loraplus_lr_ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al., 2024) as optimizer parameter groups: η_B = λ·η_A (ERRATA 10).

    Every trainable ``lora_B`` matrix goes to a group with rate ``lr·loraplus_lr_ratio``;
    every other trainable parameter (the A matrices, DoRA magnitudes, …) keeps ``lr`` — as
    HF PEFT's ``create_loraplus_optimizer``. Pass the result to ``minipeft.optim.AdamW``.
    """
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio: expected a positive number, got {loraplus_lr_ratio}")
    group_a: list[Parameter] = []
    group_b: list[Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (group_b if ".lora_B." in f".{name}" else group_a).append(p)
    if not group_b:
        raise ValueError("model: has no trainable lora_B parameter; is it a LoRA model?")
    return [
        {"params": group_a, "lr": float(lr), "weight_decay": weight_decay},
        {"params": group_b, "lr": float(lr) * loraplus_lr_ratio, "weight_decay": weight_decay},
    ]
