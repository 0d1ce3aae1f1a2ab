"""Shared test configuration: hypothesis profiles.

Tests that need an optional peer (torch, transformers, peft, bitsandbytes) call
``pytest.importorskip(name, reason="...")`` so they skip with a reason when it is missing.
"""

from __future__ import annotations

import os

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
