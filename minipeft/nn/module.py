"""Module and Parameter: a tree of named weights, as in PyTorch.

Attribute assignment registers children: a ``Parameter`` becomes a parameter, a
``Module`` a submodule. Names join with dots (``transformer.h.0.attn.c_attn.weight``), so
Hugging Face state dicts and PEFT adapter files map onto minipeft modules unchanged.
Freezing is ``requires_grad=False`` on a parameter: such a parameter never gets a
gradient buffer, and backward skips computing its gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor

__all__ = ["Module", "ModuleList", "Parameter"]


class Parameter(Tensor):
    """A trainable Tensor (``requires_grad=True`` unless frozen); floats take the default dtype."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        if isinstance(data, Tensor):
            data = data.data
        # a new parameter lives on the current backend: initial values drawn on the host
        # (one seeded generator for both backends) are moved there once
        arr = backend.to_device(data)
        if arr.dtype.kind != "f":
            arr = arr.astype(backend.default_dtype())
        super().__init__(arr, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return (
            f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"
        )


class Module:
    """Base class: holds parameters, buffers and submodules in registration order."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() first")
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value: Any, persistent: bool = True) -> None:
        """A non-trainable array saved in the state dict (if ``persistent``); a host array
        given under ``set_backend("cupy")`` is moved to the device, as parameters are."""
        self._buffers[name] = persistent
        object.__setattr__(self, name, None if value is None else backend.to_device(value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} defines no forward")

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, mod in self._modules.items():
            yield from mod.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) for each distinct parameter (tied weights once)."""
        seen: set[int] = set()
        for mname, mod in self.named_modules(prefix):
            for pname, p in mod._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, target: str) -> Module:
        mod: Module = self
        for part in target.split(".") if target else []:
            if part not in mod._modules:
                raise KeyError(
                    f"target: {type(mod).__name__} has no submodule {part!r} ({target!r})"
                )
            mod = mod._modules[part]
        return mod

    # ------------------------------------------------------------------ placement
    def to(self, device: str) -> Module:
        """Move every parameter (with its gradient), buffer and array-valued attribute of
        this module and its submodules to ``"numpy"`` (host) or ``"cupy"`` (device), in
        place; returns ``self``. Tied parameters stay tied (the Parameter objects are kept,
        only their arrays move), so optimizers keep referring to them and move their own
        state on their next step.
        """
        if device not in ("numpy", "cupy"):
            raise ValueError(f"device: expected 'numpy' or 'cupy', got {device!r}")
        moved: set[int] = set()

        def move(t: Tensor) -> None:
            if id(t) in moved:
                return
            moved.add(id(t))
            t.data = backend.to_device(t.data, device)
            if t.grad is not None:
                t.grad = backend.to_device(t.grad, device)

        for mod in self.modules():
            for p in mod._parameters.values():
                move(p)
            for name, value in list(vars(mod).items()):
                if name in mod._parameters or name.startswith("__"):
                    continue
                if isinstance(value, Tensor):
                    move(value)
                elif _is_array(value):
                    object.__setattr__(mod, name, backend.to_device(value, device))
            mod._move_state(device)
        return self

    def _move_state(self, device: str) -> None:
        """Hook: move state kept outside plain attributes (dicts of arrays, allocators)."""

    def placement(self) -> str:
        """``"numpy"`` or ``"cupy"``: where this module's parameters live (the first one's
        place; ``"numpy"`` for a module without parameters)."""
        p = next(self.parameters(), None)
        return "numpy" if p is None else backend.placement(p.data)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter of this module."""
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Name → array for every parameter and persistent buffer (tied tensors under each name)."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for mname, mod in self.named_modules():
            pre = f"{mname}." if mname else ""
            for pname, p in mod._parameters.items():
                out[pre + pname] = p.data
            for bname, persistent in mod._buffers.items():
                if persistent:
                    out[pre + bname] = getattr(mod, bname)
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> list[str]:
        """Copy arrays into parameters/buffers in place; validate names, shapes, dtypes first.

        Nothing is written unless every entry is valid (no half-loaded model). With
        ``strict`` both missing and unexpected keys are errors; otherwise the missing
        keys are returned.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state: missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
            )
        for k, cur in own.items():
            if k not in state:
                continue
            val = state[k]
            val = val.data if isinstance(val, Tensor) else val
            if tuple(val.shape) != tuple(cur.shape):
                raise ValueError(
                    f"state[{k!r}]: expected shape {tuple(cur.shape)}, got {tuple(val.shape)}"
                )
            if np.dtype(val.dtype).kind != np.dtype(cur.dtype).kind:
                raise TypeError(f"state[{k!r}]: expected a {cur.dtype} array, got {val.dtype}")
        for k, cur in own.items():
            if k in state:
                val = state[k]
                val = val.data if isinstance(val, Tensor) else val
                # loaded host arrays are copied to where the parameter lives (one explicit
                # transfer per tensor), so a device model stays on the device
                cur[...] = backend.to_device(val, backend.placement(cur)).astype(
                    cur.dtype, copy=False
                )
        return missing

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, mod in self._modules.items():
            sub = repr(mod).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or backend.placement(value) == "cupy"


class ModuleList(Module):
    """A list of modules named ``0``, ``1``, … (``transformer.h.0``)."""

    def __init__(self, modules: list[Module] | None = None) -> None:
        super().__init__()
        for m in modules or []:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())
