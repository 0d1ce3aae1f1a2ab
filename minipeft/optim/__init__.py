"""Optimizers (SGD, AdamW) with parameter groups, learning-rate schedules, save/resume."""

from .adamw import AdamW, adamw_update
from .io import load_state, save_state
from .optimizer import Optimizer
from .schedules import (
    LambdaLR,
    cosine_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    linear_with_warmup,
)
from .sgd import SGD, sgd_update

__all__ = [
    "SGD", "AdamW", "LambdaLR", "Optimizer", "adamw_update", "cosine_with_warmup",
    "get_cosine_schedule_with_warmup", "get_linear_schedule_with_warmup", "linear_with_warmup",
    "load_state", "save_state", "sgd_update",
]  # fmt: skip
