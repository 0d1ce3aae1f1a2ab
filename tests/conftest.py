"""Shared test configuration: hypothesis profiles.

Tests that need an optional peer (torch, transformers, peft, bitsandbytes) call
``pytest.importorskip(name, reason="...")`` so they skip with a reason when it is missing.
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread for the tests and for the notebook kernels they start (children
# inherit the environment): on this project's 2-core machines the small matrix products of
# the tests run several times slower with two threads than with one.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

try:  # the variables above are too late for a BLAS this process has already loaded
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
except ImportError:  # pragma: no cover - threadpoolctl comes with scipy/scikit-learn
    pass

from hypothesis import HealthCheck, settings  # noqa: E402

# JIT compilation (Numba) trips hypothesis' per-example deadline: no deadline anywhere.
settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
