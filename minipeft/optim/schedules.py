"""Learning-rate schedules: a multiplier per step, applied to each group's base rate.

``LambdaLR`` behaves as ``torch.optim.lr_scheduler.LambdaLR``: at construction it
records each group's ``initial_lr`` and sets ``lr = initial_lr · f(0)``; every
``step()`` (called after ``optimizer.step()``) advances the counter k and sets
``lr = initial_lr · f(k)``. The two multipliers are Hugging Face's
``get_cosine_schedule_with_warmup`` and ``get_linear_schedule_with_warmup``
(derivations/optim.md, ``optim.cosine_schedule``, ``optim.linear_schedule``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from .optimizer import Optimizer

__all__ = [
    "LambdaLR",
    "cosine_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "linear_with_warmup",
]


def _check_steps(num_warmup_steps: Any, num_training_steps: Any) -> None:
    for name, v in (("num_warmup_steps", num_warmup_steps),
                    ("num_training_steps", num_training_steps)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected a non-negative integer, got {v!r}")
        if v < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")


def cosine_with_warmup(
    step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
) -> float:
    """Multiplier f(k): linear warmup, then cosine decay to 0.  [optim.cosine_schedule]

        f(k) = k / W                                   for k < W
        f(k) = max(0, ½·(1 + cos(2π·c·p))),  p = (k − W) / (T − W)    otherwise

    W = ``num_warmup_steps``, T = ``num_training_steps``, c = ``num_cycles`` (½: one
    half-period, from 1 down to 0 at k = T).
    """
    if step < num_warmup_steps:
        # f = k / W
        return float(step) / float(max(1, num_warmup_steps))
    # p = (k − W)/(T − W)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    # f = ½(1 + cos(2πc·p))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def linear_with_warmup(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    """Multiplier f(k): linear warmup, then linear decay to 0 at T.  [optim.linear_schedule]

    f(k) = k / W                      for k < W
    f(k) = max(0, (T − k) / (T − W))  otherwise
    """
    if step < num_warmup_steps:
        # f = k / W
        return float(step) / float(max(1, num_warmup_steps))
    # f = (T − k)/(T − W)
    return max(
        0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps))
    )


class LambdaLR:
    """Set ``group["lr"] = group["initial_lr"] · f(k)`` for the step counter k.

    ``lr_lambda`` is one multiplier for all groups or one per group (so the ratio between
    groups, e.g. LoRA+'s η_B/η_A, is kept along the schedule). ``last_epoch = -1`` starts
    a new schedule; a larger value resumes one (the groups must then hold ``initial_lr``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a minipeft Optimizer, got {type(optimizer)}")
        self.optimizer = optimizer
        n = len(optimizer.param_groups)
        if callable(lr_lambda):
            self.lr_lambdas = [lr_lambda] * n
        elif not isinstance(lr_lambda, list | tuple):
            raise TypeError(
                f"lr_lambda: expected a callable or a list of {n} callables, "
                f"got {type(lr_lambda).__name__}"
            )
        else:
            self.lr_lambdas = list(lr_lambda)
            if len(self.lr_lambdas) != n or not all(callable(f) for f in self.lr_lambdas):
                raise ValueError(
                    f"lr_lambda: expected one callable or {n} callables (one per group), "
                    f"got {len(self.lr_lambdas)}"
                )
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"last_epoch: expected an integer ≥ -1, got {last_epoch!r}")
        for i, g in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                g.setdefault("initial_lr", g["lr"])
            elif "initial_lr" not in g:
                raise KeyError(
                    f"param_groups[{i}]: 'initial_lr' is missing; it is required when "
                    f"resuming a schedule (last_epoch={last_epoch})"
                )
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def get_lr(self) -> list[float]:
        """η_k = η₀·f(k) for every group at the current counter k."""
        return [b * float(f(self.last_epoch)) for b, f in zip(self.base_lrs, self.lr_lambdas)]

    def step(self) -> None:
        """Advance k by one and write the new rates into the optimizer's groups."""
        self.last_epoch += 1
        lrs = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            if lr < 0:
                raise ValueError(f"lr_lambda: gave a negative learning rate {lr} at step "
                                 f"{self.last_epoch}")  # fmt: skip
            g["lr"] = lr
        self._last_lr = lrs

    def get_last_lr(self) -> list[float]:
        """The rates set by the last ``step`` (one per group)."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: the counter and base rates (the multipliers are code)."""
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs),
                "_last_lr": list(self._last_lr)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter and base rates saved by ``state_dict``."""
        base = state.get("base_lrs")
        if not isinstance(base, list) or len(base) != len(self.base_lrs):
            raise ValueError(
                f"state['base_lrs']: expected a list of {len(self.base_lrs)} rates, got {base!r}"
            )
        last = state.get("last_epoch")
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise ValueError(f"state['last_epoch']: expected a non-negative integer, got {last!r}")
        self.base_lrs = [float(b) for b in base]
        self.last_epoch = last
        self._last_lr = [float(x) for x in state.get("_last_lr", self.get_lr())]


def get_cosine_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup over W steps, then cosine decay to 0 at T (Hugging Face's schedule)."""
    _check_steps(num_warmup_steps, num_training_steps)
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int | float):
        raise TypeError(f"num_cycles: expected a number, got {num_cycles!r}")
    if not math.isfinite(num_cycles) or num_cycles < 0:
        raise ValueError(f"num_cycles: expected a finite number ≥ 0, got {num_cycles!r}")
    f = functools.partial(
        cosine_with_warmup,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )
    return LambdaLR(optimizer, f, last_epoch)


def get_linear_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> LambdaLR:
    """Linear warmup over W steps, then linear decay to 0 at T (Hugging Face's schedule)."""
    _check_steps(num_warmup_steps, num_training_steps)
    f = functools.partial(
        linear_with_warmup,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )
    return LambdaLR(optimizer, f, last_epoch)
