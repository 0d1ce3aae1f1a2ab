"""Shared test configuration: hypothesis profiles and helpers for optional peers."""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

# JIT compilation (Numba) trips hypothesis' per-example deadline: no deadline anywhere.
settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def require(module: str, reason: str | None = None):
    """Import an optional peer (torch, transformers, peft, bitsandbytes) or skip with a reason."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(
            reason
            or f"{module} is not installed: install the 'crosscheck' extra to run this comparison"
        )
