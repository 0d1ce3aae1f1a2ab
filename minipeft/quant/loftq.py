"""LoftQ: initialize QLoRA so that the 4-bit base and the adapter together approximate W.

Derivation: derivations/qlora_layer.md. LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware
Quantization for Large Language Models") chooses the quantized base Q and the adapter (B, A)
jointly, minimizing

    E(Q, B, A) = ‖W − Q − s·B·A‖_F        Q ∈ 4-bit grid, B (out, r), A (r, in)

by alternating, from L₀ = s·B₀·A₀ = 0 (plain QLoRA: Q = quant(W), B = 0):

    Q_t        = quant(W − L_{t−1})                      quantize what the adapter misses
    (B_t, A_t) = rank-r truncated SVD of W − Q_t          Eckart–Young: optimal for fixed Q_t
    L_t        = s·B_t·A_t

With W − Q_t = U·S·Vᵀ, the singular values are split evenly between the factors, as in
LoftQ and HF PEFT (``_low_rank_decomposition``): B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ, so
s·B·A = U_r·S_r·V_rᵀ. (HF PEFT 0.21 assigns B = U_r·√S_r, A = √S_r·V_rᵀ without dividing by
s, so its initialization reproduces Q + B·A, i.e. W only when s = α/r = 1.)

The SVD half-step never increases E (it is the minimum over rank-r matrices). The
quantization half-step is nearest rounding on a grid whose block scales (absmax) are set by
the new residual; it is not an exact minimizer over the grid, so E is not guaranteed to fall
at every full step — ``loftq_init`` records E after every half-step so that it can be seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import backend
from ..backend import to_numpy
from ..nn.module import Module
from .blockwise import QuantState, dequantize_4bit, quantize_4bit

__all__ = ["LoftQResult", "loftq_init", "loftq_model", "lowrank_svd"]


def lowrank_svd(residual: np.ndarray, r: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-r s·B·A ≈ R in Frobenius norm: (A (r, in), B (out, r)), float64.

    [loftq.svd_step_optimal]

    R = U·S·Vᵀ;  B = U_r·diag(√(S_r/s)),  A = diag(√(S_r/s))·V_rᵀ,  so s·B·A = U_r·S_r·V_rᵀ
    and ‖R − s·B·A‖²_F = Σ_{i>r} σᵢ² (Eckart–Young–Mirsky): no rank-r matrix does better.
    """
    res = np.asarray(residual, dtype=np.float64)
    if res.ndim != 2:
        raise ValueError(f"residual: expected a 2-D matrix, got shape {res.shape}")
    if not isinstance(r, int | np.integer) or not 0 < r <= min(res.shape):
        raise ValueError(f"r: expected an integer in [1, {min(res.shape)}], got {r!r}")
    if not scale > 0:
        raise ValueError(f"scale: expected a positive number, got {scale!r}")
    u, sv, vt = np.linalg.svd(res, full_matrices=False)  # R = U·S·Vᵀ
    root = np.sqrt(sv[:r] / scale)  # √(S_r / s)
    b = u[:, :r] * root[None, :]  # B = U_r·√(S_r/s)   (out, r)
    a = root[:, None] * vt[:r]  # A = √(S_r/s)·V_rᵀ   (r, in)
    return a, b


@dataclass
class LoftQResult:
    """What ``loftq_init`` returns: the 4-bit base, the adapter, and the error trajectory.

    ``packed``/``state``: Q in the stored layout ((in, out) when ``fan_in_fan_out``).
    ``A`` (r, in), ``B`` (out, r) in W's dtype. ``errors[t]`` = ‖W − Q_t − s·B_t·A_t‖_F after
    iteration t (t = 0: plain QLoRA, Q = quant(W), B = 0); ``errors_after_quant[t]`` =
    ‖W − Q_t − s·B_{t−1}·A_{t−1}‖_F, between the two half-steps of iteration t ≥ 1.
    """

    packed: np.ndarray
    state: QuantState
    A: np.ndarray
    B: np.ndarray
    scale: float
    errors: list[float] = field(default_factory=list)
    errors_after_quant: list[float] = field(default_factory=list)


def _quantize(m: np.ndarray, fan_in_fan_out: bool, dtype: Any, **kw: Any):
    """Q = quant(M) in the stored layout; returns (packed, state, Q̂ (out, in) float64)."""
    stored = m.T if fan_in_fan_out else m
    packed, state = quantize_4bit(np.ascontiguousarray(stored, dtype=dtype), **kw)
    q = dequantize_4bit(packed, state).astype(np.float64)
    return packed, state, (q.T if fan_in_fan_out else q)


def loftq_init(
    w: np.ndarray,
    r: int,
    scale: float = 1.0,
    num_iter: int = 5,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    fan_in_fan_out: bool = False,
) -> LoftQResult:
    """LoftQ's alternating minimization of ‖W − Q − s·B·A‖_F, ``num_iter`` rounds.

    [loftq.monotone]

    w: the float weight in the (out, in) layout. Each round: Q_t = quant(W − s·B·A) (blockwise
    4-bit, quantized in the stored layout: Wᵀ's when ``fan_in_fan_out``), then
    (B, A) = rank-r SVD of W − Q_t (``lowrank_svd``). The SVD half-step never raises the
    error; the quantization half-step may (see the module docstring) — both are recorded.
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise ValueError(f"w: expected a 2-D float matrix, got {w.dtype} of shape {w.shape}")
    if not isinstance(num_iter, int | np.integer) or num_iter < 1:
        raise ValueError(f"num_iter: expected a positive integer, got {num_iter!r}")
    kw = {"blocksize": blocksize, "quant_type": quant_type, "double_quant": double_quant}
    w64 = w.astype(np.float64)
    packed, state, q = _quantize(w64, fan_in_fan_out, w.dtype, **kw)  # plain QLoRA: Q(W)
    errors = [float(np.linalg.norm(w64 - q))]  # E₀ = ‖W − Q(W)‖, B = 0
    after_q: list[float] = []
    low = np.zeros_like(w64)  # L = s·B·A
    a = b = None
    for _ in range(int(num_iter)):
        packed, state, q = _quantize(w64 - low, fan_in_fan_out, w.dtype, **kw)  # Q = quant(W − L)
        after_q.append(float(np.linalg.norm(w64 - q - low)))
        a, b = lowrank_svd(w64 - q, r, scale)  # (B, A) = SVD_r(W − Q)
        low = scale * (b @ a)  # L = s·B·A
        errors.append(float(np.linalg.norm(w64 - q - low)))  # ‖W − Q − s·B·A‖_F
    return LoftQResult(
        packed, state, a.astype(w.dtype), b.astype(w.dtype), float(scale), errors, after_q
    )


def loftq_model(
    model: Module,
    config: Any,
    num_iter: int = 5,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    adapter_name: str = "default",
) -> Any:
    """Quantize ``config.target_modules`` of ``model`` with LoftQ and wrap them with LoRA.

    ``config`` is a ``LoraConfig`` (r, lora_alpha, use_rslora, target_modules, rank/alpha
    patterns). Each target (``Linear`` or GPT-2 ``Conv1D``) becomes a ``Linear4bit`` holding
    LoftQ's Q, and its adapter starts at LoftQ's (A, B) instead of B = 0. Returns the
    ``PeftModel`` (as ``get_peft_model``); ``model`` is changed in place.
    """
    from ..peft import LoraConfig, get_peft_model, lora_scaling
    from ..peft.config import target_matches
    from ..peft.qlora import Linear4bit

    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a LoraConfig, got {type(config).__name__}")
    names = [n for n, m in model.named_modules() if n and target_matches(config.target_modules, n)]
    if not names:
        raise ValueError(f"target_modules: {config.target_modules!r} matched no module")
    adapters = {}
    for name in names:
        mod = model.get_submodule(name)
        kind = type(mod).__name__
        if kind not in ("Linear", "Conv1D"):
            raise ValueError(f"target_modules: {name!r} is a {kind}, not a Linear or Conv1D")
        fifo = kind == "Conv1D"
        r, alpha = config.rank_and_alpha(name)
        s = lora_scaling(r, alpha, config.use_rslora)
        # LoftQ alternates SVDs and 4-bit quantization in float64 on the host: one explicit
        # copy of W in, the codes and (A, B) back beside the model
        w = to_numpy(mod.weight.data)
        res = loftq_init(
            w.T if fifo else w, r, s, num_iter, quant_type=quant_type, blocksize=blocksize,
            double_quant=double_quant, fan_in_fan_out=fifo,
        )  # fmt: skip
        q = Linear4bit.from_quantized(
            res.packed, res.state, getattr(mod, "bias", None), fan_in_fan_out=fifo
        ).to(mod.weight.placement())  # where the layer it replaces lived
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = q  # same name, same place in the parent's child order
        object.__setattr__(parent, child, q)
        adapters[name] = res
    pm = get_peft_model(model, config, adapter_name)
    for name, res in adapters.items():
        layer = model.get_submodule(name)
        for holder, value in ((layer.lora_A, res.A), (layer.lora_B, res.B)):
            target = holder[adapter_name].weight.data
            target[...] = backend.like(value, target)
    return pm
