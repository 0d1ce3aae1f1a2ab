"""Stochastic gradient descent with momentum (heavy ball or Nesterov) and coupled decay.

The weight decay here is L2 regularization added to the gradient, g ← g + λθ, as in
``torch.optim.SGD`` (for plain SGD this equals decoupled decay with the same η·λ; with
momentum it does not, because the decay then passes through the momentum buffer).
Matches ``torch.optim.SGD`` (maximize=False) update for update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..autograd.tensor import Tensor
from .optimizer import Optimizer, check_hyper

__all__ = ["SGD", "sgd_update"]


def sgd_update(
    param: Any,
    grad: Any,
    buf: Any,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> Any:
    """One SGD update of the array ``param`` in place; returns the momentum buffer.

    [optim.sgd_momentum]  ``buf`` is ``None`` before the first update (then b₁ = g,
    without dampening).

        g ← g + λθ                                  coupled (L2) decay
        b ← μ·b + (1 − τ)·g                         momentum, τ = dampening
        d = g + μ·b  (Nesterov)   or   d = b
        θ ← θ − η·d
    """
    # g ← g + λθ   (a new array: the caller's .grad is left unchanged)
    if weight_decay != 0.0:
        grad = grad + weight_decay * param
    if momentum != 0.0:
        if buf is None:
            # b₁ = g
            buf = grad.copy()
        else:
            # b ← μb + (1 − τ)g
            buf *= momentum
            buf += (1.0 - dampening) * grad
        # d = g + μb (Nesterov) or d = b
        direction = grad + momentum * buf if nesterov else buf
    else:
        direction = grad
    # θ ← θ − η·d
    param -= lr * direction
    return buf


class SGD(Optimizer):
    """SGD with parameter groups (lr, momentum, dampening, nesterov, weight_decay per group).

    State per parameter (only with momentum): ``momentum_buffer``, an array of the
    parameter's shape and dtype. Nesterov needs momentum > 0 and dampening = 0.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            },
        )

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_hyper(f"{where}.lr", group["lr"], low=0.0)
        momentum = check_hyper(f"{where}.momentum", group["momentum"], low=0.0)
        dampening = check_hyper(
            f"{where}.dampening", group["dampening"], low=0.0, high=1.0, high_open=False
        )
        check_hyper(f"{where}.weight_decay", group["weight_decay"], low=0.0)
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"{where}.nesterov: expected a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                f"{where}.nesterov: needs momentum > 0 and dampening = 0, got "
                f"momentum={momentum}, dampening={dampening}"
            )

    def _update(self, group: dict[str, Any], p: Tensor, grad: Any, state: dict[str, Any]) -> None:
        buf = sgd_update(
            p.data,
            grad,
            state.get("momentum_buffer"),
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            nesterov=group["nesterov"],
            weight_decay=float(group["weight_decay"]),
        )
        if buf is not None:
            state["momentum_buffer"] = buf
