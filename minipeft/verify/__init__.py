"""Verification harness: the equation registry and the ``verify`` command."""

from .registry import Equation, Outcome, Result, collect, equation, run, select

__all__ = ["Equation", "Outcome", "Result", "collect", "equation", "run", "select"]
