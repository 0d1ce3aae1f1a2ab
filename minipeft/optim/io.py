"""Save and resume optimizer (and schedule) state: one safetensors file, JSON in its header.

Arrays (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) are stored as tensors named
``state.<param index>.<name>``; everything else — the param groups' hyperparameters, the
integer step counters, the schedule's counter and base rates — goes, as JSON, into the
safetensors metadata under ``"minipeft_optim"``. Nothing is pickled. The file is written
atomically (``minipeft.io.atomic_write``: temporary file, fsync, rename).
"""

from __future__ import annotations

import json
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
    """Restore state written by ``save_state`` into ``optimizer`` (and ``scheduler``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        if "minipeft_optim" not in meta:
            raise ValueError(f"path: {path} is not a minipeft optimizer state file")
        header = json.loads(meta["minipeft_optim"])
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    if header.get("format") != _FORMAT:
        raise ValueError(f"path: expected format {_FORMAT!r}, got {header.get('format')!r}")
    if header.get("optimizer") != type(optimizer).__name__:
        raise TypeError(
            f"optimizer: the file holds {header.get('optimizer')} state, "
            f"got a {type(optimizer).__name__}"
        )
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in header["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    for key, arr in arrays.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = arr
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    if scheduler is not None:
        if header.get("scheduler") is None:
            raise ValueError(f"scheduler: {path} holds no schedule state")
        scheduler.load_state_dict(header["scheduler"])
