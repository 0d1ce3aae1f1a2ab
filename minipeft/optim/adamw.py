"""AdamW: Adam with bias correction and decoupled weight decay (derivations/optim.md).

Kingma & Ba (2015) for the moments and their bias correction; Loshchilov & Hutter (2019)
for the decoupled decay θ ← θ − η·λ·θ, applied to the weights directly instead of being
added to the gradient (where Adam's 1/√v̂ would rescale it per coordinate). The lecture's
version (3.6, Step 5) has no bias correction and decays by −λθ without η (ERRATA 9);
derivations/optim.md shows by how much both change the updates.

Matches ``torch.optim.AdamW`` (amsgrad=False, maximize=False) update for update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .. import backend
from ..autograd.tensor import Tensor
from .optimizer import Optimizer, check_hyper

__all__ = ["AdamW", "adamw_update"]


def adamw_update(
    param: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update of the arrays ``param``, ``exp_avg`` (m), ``exp_avg_sq`` (v), in place.

    ``step`` is t ≥ 1, the number of this update.  [optim.adamw_bias_correction]
    [optim.adamw_decoupled_decay]

        θ ← θ·(1 − η·λ)                          decoupled decay, before the moments
        m ← β₁·m + (1 − β₁)·g
        v ← β₂·v + (1 − β₂)·g²
        m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)     bias correction
        θ ← θ − η·m̂ / (√v̂ + ε)
    """
    xp = backend.xp_of(param)
    # θ ← θ·(1 − ηλ)   (decoupled: it does not pass through m and v)
    if weight_decay != 0.0:
        param *= 1.0 - lr * weight_decay
    # m ← β₁m + (1 − β₁)g
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * grad
    # v ← β₂v + (1 − β₂)g²
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * (grad * grad)
    # m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ); the step η/(1 − β₁ᵗ) carries m̂'s correction
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    # √v̂ + ε = √v/√(1 − β₂ᵗ) + ε
    denom = xp.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + eps
    # θ ← θ − η·m̂/(√v̂ + ε)
    param -= step_size * exp_avg / denom


class AdamW(Optimizer):
    """AdamW with parameter groups (lr, betas, eps, weight_decay per group).

    Defaults are PyTorch's: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2.
    State per parameter: ``step`` (int), ``exp_avg`` (m) and ``exp_avg_sq`` (v), arrays of
    the parameter's shape and dtype, created at its first update.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_hyper(f"{where}.lr", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"{where}.betas: expected a pair (β₁, β₂), got {betas!r}")
        check_hyper(f"{where}.betas[0]", betas[0], low=0.0, high=1.0)
        check_hyper(f"{where}.betas[1]", betas[1], low=0.0, high=1.0)
        group["betas"] = (float(betas[0]), float(betas[1]))
        check_hyper(f"{where}.eps", group["eps"], low=0.0, low_open=True)
        check_hyper(f"{where}.weight_decay", group["weight_decay"], low=0.0)

    def _update(self, group: dict[str, Any], p: Tensor, grad: Any, state: dict[str, Any]) -> None:
        if not state:
            xp = backend.xp_of(p.data)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_update(
            p.data,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
        )
