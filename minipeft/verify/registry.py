"""The equation registry: every derived equation, the function that implements it, a check.

An entry is added where the check is written, with the ``@equation`` decorator:

    @equation(
        "attention.grad_S",
        what="softmax backward dS = P ⊙ (dP − rowsum(dP ⊙ P))",
        derivation="attention.md",
        implements=attention_fused,          # its docstring must name the id
        tol=1e-6,
    )
    def _check() -> Outcome:
        ...                                  # float64 finite differences or a reference
        return Outcome(error=err, arrays={"q": q, "k": k, ..., "dq": dq})

The check returns the measured error (compared with ``tol``) and the arrays that make the
golden vector: inputs, outputs and gradients, exported by ``verify --export DIR``.
Check modules live in ``minipeft/verify/checks/`` and are discovered automatically.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend

__all__ = [
    "DERIVATIONS_DIR",
    "Equation",
    "Outcome",
    "Result",
    "collect",
    "equation",
    "run",
    "select",
]

DERIVATIONS_DIR = Path(__file__).resolve().parents[2] / "derivations"


@dataclass
class Outcome:
    """What a check measured: the error to compare with the tolerance, and golden arrays."""

    error: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Equation:
    """One registered equation: id, what it says, where it is derived, what computes it."""

    id: str
    what: str
    derivation: str  # file name in derivations/, e.g. "attention.md"
    implements: Callable[..., Any]
    tol: float
    check: Callable[[], Outcome]

    @property
    def link(self) -> str:
        """Relative link to the derivation section (the anchor is the id)."""
        return f"derivations/{self.derivation}#{self.id}"

    @property
    def implementation_name(self) -> str:
        fn = self.implements
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(frozen=True)
class Result:
    """A check that was run: its equation, the measured error, pass/fail, time taken."""

    equation: Equation
    error: float
    passed: bool
    seconds: float
    arrays: dict[str, np.ndarray]
    message: str = ""  # the exception, when the check raised
    note: str = ""  # what the check wants the reader to know (Outcome.note)


_REGISTRY: dict[str, Equation] = {}


def equation(
    id: str,
    *,
    what: str,
    derivation: str,
    implements: Callable[..., Any],
    tol: float,
) -> Callable[[Callable[[], Outcome]], Callable[[], Outcome]]:
    """Register the decorated zero-argument check function under ``id``."""
    if not isinstance(id, str) or "." not in id or " " in id:
        raise ValueError(f"id: expected a dotted id such as 'lora.grad_A', got {id!r}")
    if not derivation.endswith(".md") or "/" in derivation:
        raise ValueError(f"derivation: expected a file name like 'lora.md', got {derivation!r}")
    if not (isinstance(tol, float | int) and tol >= 0):
        raise ValueError(f"tol: expected a non-negative number, got {tol!r}")

    def register(check: Callable[[], Outcome]) -> Callable[[], Outcome]:
        if id in _REGISTRY:
            raise ValueError(f"id: {id!r} is registered twice")
        _REGISTRY[id] = Equation(id, what, derivation, implements, float(tol), check)
        return check

    return register


def collect() -> dict[str, Equation]:
    """Import every module of ``minipeft.verify.checks`` and return the registry."""
    from . import checks

    for mod in pkgutil.iter_modules(checks.__path__):
        importlib.import_module(f"{checks.__name__}.{mod.name}")
    return _REGISTRY


def select(pattern: str | None = None) -> list[Equation]:
    """Equations whose id matches ``pattern`` (a glob, or a prefix such as 'attention')."""
    eqs = sorted(collect().values(), key=lambda e: e.id)
    if not pattern:
        return eqs
    glob = pattern if any(c in pattern for c in "*?[") else f"{pattern}*"
    return [e for e in eqs if fnmatch.fnmatchcase(e.id, glob)]


def run(equations: list[Equation]) -> list[Result]:
    """Run each check; an exception is a failure with its message, never a crash.

    The checks are the host's float64 oracle (their references and golden vectors are
    NumPy arrays), so they always run on the NumPy backend, whatever backend is selected:
    a notebook on the GPU still shows the same report. That the device computes the same
    is the backend tests' job (tests/test_ops.py and tests/test_device.py, run per backend).
    """
    results = []
    for eq in equations:
        t0 = time.perf_counter()
        try:
            with backend.using("numpy"):
                out = eq.check()
            err = float(out.error)
            passed = bool(np.isfinite(err) and err <= eq.tol)
            dt = time.perf_counter() - t0
            results.append(Result(eq, err, passed, dt, out.arrays, note=out.note))
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            results.append(Result(eq, float("nan"), False, time.perf_counter() - t0, {}, msg))
    return results
