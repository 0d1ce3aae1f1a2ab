"""Save and resume optimizer (and schedule) state: one safetensors file, JSON in its header.

Arrays (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) are stored as tensors named
``state.<param index>.<name>``; everything else — the param groups' hyperparameters, the
integer step counters, the schedule's counter and base rates — goes, as JSON, into the
safetensors metadata under ``"minipeft_optim"``. Nothing is pickled. The file is written
atomically (``minipeft.io.atomic_write``: temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from ..io import atomic_write
from .optimizer import Optimizer
from .schedules import LambdaLR

__all__ = ["load_state", "save_state"]

_FORMAT = "minipeft-optim/1"


def save_state(
    path: str | os.PathLike[str], optimizer: Optimizer, scheduler: LambdaLR | None = None
) -> Path:
    """Write ``optimizer.state_dict()`` (and ``scheduler.state_dict()``) to ``path``."""
    from safetensors.numpy import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, val in entry.items():
            if "." in name:
                raise ValueError(f"state name {name!r}: must not contain '.'")
            if hasattr(val, "shape"):
                tensors[f"state.{idx}.{name}"] = np.ascontiguousarray(backend.to_numpy(val))
            else:
                scalars.setdefault(str(idx), {})[name] = val
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    header = {
        "format": _FORMAT,
        "optimizer": type(optimizer).__name__,
        "param_groups": groups,
        "scalars": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    meta = {"minipeft_optim": json.dumps(header)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(
    path: str | os.PathLike[str], optimizer: Optimizer, scheduler: LambdaLR | None = None
) -> None:
    """Restore state written by ``save_state`` into ``optimizer`` (and ``scheduler``).

    The whole file is validated before anything is restored — the safetensors header and
    data, the JSON record (types, finiteness, indices, group keys), the schedule's state —
    so a bad file raises ValueError/TypeError naming it and leaves both objects unchanged.
    """
    from ..models.io import CheckpointError, load_safetensors, loads_json, read_safetensors_header

    p = Path(path)
    meta = read_safetensors_header(p).get("__metadata__") or {}
    raw = meta.get("minipeft_optim") if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise ValueError(f"path: {p} is not a minipeft optimizer state file")
    header = loads_json(raw, f"{p}: metadata 'minipeft_optim'")
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: 'minipeft_optim' must be a JSON object, got {header!r}")
    if header.get("format") != _FORMAT:
        raise ValueError(f"{p}: expected format {_FORMAT!r}, got {header.get('format')!r}")
    if header.get("optimizer") != type(optimizer).__name__:
        raise TypeError(
            f"optimizer: {p} holds {header.get('optimizer')} state, "
            f"got a {type(optimizer).__name__}"
        )
    groups = _checked_groups(p, header.get("param_groups"), optimizer)
    indices = {i for g in groups for i in g["params"]}
    state: dict[int, dict[str, Any]] = {}
    scalars = header.get("scalars")
    if not isinstance(scalars, dict):
        raise CheckpointError(f"{p}: 'scalars' must be a JSON object, got {scalars!r}")
    for idx, entry in scalars.items():
        i = _checked_index(p, idx, indices, f"scalars[{idx!r}]")
        if not isinstance(entry, dict) or not all(_finite_number(v) for v in entry.values()):
            raise CheckpointError(
                f"{p}: scalars[{idx!r}] must map names to finite numbers, got {entry!r}"
            )
        state.setdefault(i, {}).update(entry)
    for key, arr in load_safetensors(p).items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[2]:
            raise CheckpointError(f"{p}: unexpected tensor {key!r} (expected state.<i>.<name>)")
        i = _checked_index(p, parts[1], indices, f"tensor {key!r}")
        if arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise CheckpointError(
                f"{p}: tensor {key!r}: expected finite floating values, got dtype {arr.dtype}"
            )
        state.setdefault(i, {})[parts[2]] = arr
    sched_state = None
    if scheduler is not None:
        sched_state = _checked_schedule(p, header.get("scheduler"), scheduler)
    try:  # validates shapes and hyperparameters before it changes anything
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (TypeError, ValueError, KeyError) as exc:
        raise type(exc)(f"{p}: {exc}") from None
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)  # checked above: cannot fail half-way


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _checked_index(p: Path, idx: Any, indices: set[int], where: str) -> int:
    if not isinstance(idx, str) or not idx.isdigit() or int(idx) not in indices:
        raise ValueError(
            f"{p}: {where}: expected a parameter index of the param groups "
            f"{sorted(indices)}, got {idx!r}"
        )
    return int(idx)


def _checked_groups(p: Path, groups: Any, optimizer: Optimizer) -> list[dict[str, Any]]:
    """The file's param groups: a list of objects with known keys and distinct int params."""
    allowed = set(optimizer.defaults) | {"params", "initial_lr", "name"}
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{p}: param_groups: expected a list of {len(optimizer.param_groups)} param groups, "
            f"got {groups!r}"[:300]
        )
    seen: set[int] = set()
    for gi, g in enumerate(groups):
        if not isinstance(g, dict) or not set(g) <= allowed:
            raise ValueError(
                f"{p}: param_groups[{gi}]: expected an object with keys among "
                f"{sorted(allowed)}, got {g!r}"[:300]
            )
        params = g.get("params")
        if (
            not isinstance(params, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in params)
            or seen & set(params)
            or len(set(params)) != len(params)
        ):
            raise ValueError(
                f"{p}: param_groups[{gi}]['params']: expected distinct non-negative integer "
                f"indices, got {params!r}"[:300]
            )
        seen |= set(params)
    return groups


def _checked_schedule(p: Path, state: Any, scheduler: LambdaLR) -> dict[str, Any]:
    """The schedule's state, checked so that ``scheduler.load_state_dict`` cannot fail."""
    if state is None:
        raise ValueError(f"scheduler: {p} holds no schedule state")
    n = len(scheduler.base_lrs)
    ok = (
        isinstance(state, dict)
        and set(state) <= {"last_epoch", "base_lrs", "_last_lr"}
        and isinstance(state.get("last_epoch"), int)
        and not isinstance(state.get("last_epoch"), bool)
        and state["last_epoch"] >= 0
        and all(
            isinstance(v, list) and len(v) == n and all(_finite_number(x) for x in v)
            for k, v in state.items()
            if k in ("base_lrs", "_last_lr")
        )
        and "base_lrs" in state
    )
    if not ok:
        raise ValueError(
            f"{p}: scheduler: expected {{'last_epoch': int >= 0, 'base_lrs': {n} finite "
            f"numbers, '_last_lr': {n} finite numbers}}, got {state!r}"[:300]
        )
    return state
