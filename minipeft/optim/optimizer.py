"""The Optimizer base class: parameter groups, per-parameter state, save and resume.

An optimizer holds ``param_groups``, a list of dicts in PyTorch's layout::

    [{"params": [A₁, A₂, ...], "lr": 1e-4, "weight_decay": 0.0, ...},
     {"params": [B₁, B₂, ...], "lr": 1.6e-3, ...}]          # LoRA+: η_B = λ·η_A

Every key a group leaves out takes the optimizer's default. ``step`` updates each
parameter's ``.data`` in place (under ``no_grad``) from its ``.grad``; a parameter whose
``.grad`` is ``None`` (frozen, or not reached by backward) is skipped entirely — no
moment update and no weight decay, as PyTorch does.

``state_dict`` holds only JSON values and arrays (never pickled objects), so that
``minipeft.optim.save_state`` can write it as one safetensors file with a JSON header.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor, no_grad

__all__ = ["Optimizer", "check_hyper"]


def check_hyper(name: str, value: Any, *, low: float, high: float | None = None,
                low_open: bool = False, high_open: bool = True) -> float:  # fmt: skip
    """``value`` as a float after checking it is a finite real number in the interval.

    The interval is [low, high) by default; ``low_open`` makes it (low, …].
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    bad_low = v <= low if low_open else v < low
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = "∞)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{name}: expected a value in {lo}{low}, {hi}, got {v}")
    return v


class Optimizer(ABC):
    """Base class: groups of parameters with their own hyperparameters, and state.

    Subclasses define ``defaults`` (passed to ``__init__``), ``_validate_group`` and
    ``_update(group, param, grad, state)``, which changes ``param.data`` in place.
    """

    def __init__(self, params: Iterable[Any], defaults: Mapping[str, Any]) -> None:
        self.defaults = dict(defaults)
        self._validate_group(self.defaults, where="defaults")
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}  # id(param) -> state
        if isinstance(params, Tensor):
            raise TypeError("params: expected an iterable of Parameters or of dicts, got a Tensor")
        groups = list(params)
        if not groups:
            raise ValueError("params: got an empty parameter list")
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    # ------------------------------------------------------------------ groups
    @abstractmethod
    def _validate_group(self, group: Mapping[str, Any], where: str) -> None:
        """Check (and normalize) one group's hyperparameters; ``where`` names it in errors."""

    def add_param_group(self, group: Mapping[str, Any]) -> None:
        """Append a group ``{"params": [...], **hyperparameters}``; missing keys take defaults."""
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"param group: expected a dict with a 'params' key, got {group!r}")
        unknown = set(group) - set(self.defaults) - {"params", "initial_lr", "name"}
        if unknown:
            raise ValueError(
                f"param group: unknown keys {sorted(unknown)} (expected some of "
                f"{sorted(self.defaults)})"
            )
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ValueError("param group: 'params' is empty")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        mine: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"param group: params[{i}] must be a Parameter, got {type(p).__name__}"
                )
            if p.dtype.kind != "f":
                raise TypeError(f"param group: params[{i}] has dtype {p.dtype}, not floating")
            if not p.is_leaf:
                raise ValueError(f"param group: params[{i}] is not a leaf tensor")
            if id(p) in seen or id(p) in mine:
                raise ValueError(f"param group: params[{i}] appears in more than one place")
            mine.add(id(p))
        new = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        new["params"] = params
        where = f"param_groups[{len(self.param_groups)}]"
        self._validate_group(new, where=where)
        self.param_groups.append(new)

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient (``set_to_none``) or fill the existing buffers with 0."""
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad[...] = 0

    def step(self) -> None:
        """One update of every parameter that has a gradient (in place, under no_grad)."""
        with no_grad():
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if tuple(grad.shape) != tuple(p.data.shape):
                        raise ValueError(
                            f"param_groups[{gi}].params[{pi}].grad: expected shape "
                            f"{tuple(p.data.shape)}, got {tuple(grad.shape)}"
                        )
                    if grad.dtype != p.data.dtype:
                        raise TypeError(
                            f"param_groups[{gi}].params[{pi}].grad: expected dtype "
                            f"{p.data.dtype}, got {grad.dtype}"
                        )
                    state = self.state.setdefault(id(p), {})
                    _follow(state, p.data)
                    self._update(group, p, grad, state)

    @abstractmethod
    def _update(self, group: dict[str, Any], p: Tensor, grad: Any, state: dict[str, Any]) -> None:
        """Update ``p.data`` in place from ``grad`` and this parameter's ``state``."""

    # ------------------------------------------------------------------ save / resume
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {name: array | number}}, "param_groups": [JSON dicts]}``.

        Parameters are numbered in group order (0, 1, …) and groups list those numbers
        under ``"params"`` — PyTorch's layout. Arrays are the live state (not copies).
        """
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        state = {index[k]: dict(v) for k, v in self.state.items() if k in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore hyperparameters and state saved by ``state_dict`` (validated first).

        Groups must match in number and size; state arrays must match their parameter's
        shape. Arrays are copied into the parameter's dtype and array namespace.
        """
        groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved_state, Mapping):
            raise ValueError("state_dict: expected keys 'state' (dict) and 'param_groups' (list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: expected {len(self.param_groups)} param groups, got {len(groups)}"
            )
        params: dict[int, Tensor] = {}
        merged_groups = []
        for gi, (mine, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"state_dict: param_groups[{gi}] has {len(saved['params'])} params, "
                    f"this optimizer has {len(mine['params'])}"
                )
            for idx, p in zip(saved["params"], mine["params"]):
                params[int(idx)] = p
            merged = {**mine, **{k: v for k, v in saved.items() if k != "params"}}
            self._validate_group(merged, where=f"state_dict.param_groups[{gi}]")  # normalizes
            merged_groups.append(merged)
        new_state: dict[int, dict[str, Any]] = {}
        for key, entry in saved_state.items():
            idx = int(key)
            if idx not in params:
                raise ValueError(f"state_dict: state for unknown parameter index {idx}")
            p = params[idx]
            xp = backend.xp_of(p.data)
            restored: dict[str, Any] = {}
            for name, val in entry.items():
                if hasattr(val, "shape") and hasattr(val, "dtype"):
                    if tuple(val.shape) != tuple(p.data.shape):
                        raise ValueError(
                            f"state_dict: state[{idx}][{name!r}]: expected shape "
                            f"{tuple(p.data.shape)}, got {tuple(val.shape)}"
                        )
                    restored[name] = xp.array(backend.to_numpy(val), dtype=p.data.dtype)
                elif isinstance(val, int | float) and not isinstance(val, bool):
                    restored[name] = val
                else:
                    raise TypeError(
                        f"state_dict: state[{idx}][{name!r}]: expected an array or a number, "
                        f"got {type(val).__name__}"
                    )
            new_state[id(p)] = restored
        for mine, merged in zip(self.param_groups, merged_groups):
            mine.update({k: v for k, v in merged.items() if k != "params"})
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hp}")
        return "\n".join([*lines, ")"])


def _follow(state: dict[str, Any], data: Any) -> None:
    """Move a parameter's state arrays to where the parameter now lives (after
    ``Module.to``): optimizers follow their parameters, once, on the next step."""
    where = backend.placement(data)
    for k, v in state.items():
        is_array = isinstance(v, np.ndarray) or backend.placement(v) == "cupy"
        if is_array and backend.placement(v) != where:
            state[k] = backend.to_device(v, where)
