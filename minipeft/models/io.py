"""Checkpoint and config files: safetensors for tensors, JSON for configs, never pickle.

Shared by the models (GPT-2, BERT) and by PEFT adapter files. Every reader validates
before it returns, and every error names the file, the entry, the expected and the
actual value:

* ``load_safetensors(path, expected)`` — name → array, checking names and shapes against
  ``expected`` (missing, unexpected and mis-shaped tensors are all reported at once).
  bfloat16 tensors (common on the Hub; NumPy has no bfloat16) are widened to float32
  exactly: a bfloat16 is the top 16 bits of a float32.
* ``save_safetensors_atomic(path, tensors, metadata)`` — written to a temporary file in
  the same directory, fsync'ed, then renamed into place (``minipeft.io.atomic_write``), so
  a reader never sees half a file.
* ``read_json_config(path, cls, ignored_keys=..., accepted_values=...)`` — a dataclass
  from a JSON object under an explicit key policy (see ``dataclass_from_dict``).

The safetensors format (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length N, N bytes of JSON mapping each name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional
``"__metadata__"`` of strings), then the raw little-endian, row-major bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .. import backend
from ..autograd.tensor import data_of
from ..io import atomic_write

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_config_sizes",
    "check_tensors",
    "dataclass_from_dict",
    "load_safetensors",
    "loads_json",
    "read_json",
    "read_json_config",
    "read_safetensors_header",
    "save_safetensors_atomic",
    "write_json_atomic",
]

T = TypeVar("T")

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint or config file does not hold what the model expects."""


# ---------------------------------------------------------------------------- safetensors
_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header size


def read_safetensors_header(path: PathLike) -> dict[str, dict[str, Any]]:
    """The JSON header of a safetensors file: name → {dtype, shape, data_offsets}.

    Reads only the header (cheap for multi-GB files). ``"__metadata__"`` is returned
    under its own key when present. Raises FileNotFoundError for a missing file and
    CheckpointError for a file that is not safetensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such safetensors file")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{p}: not a safetensors file (only {len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{p}: not a safetensors file (header length {n} for a file of {size} bytes)"
            )
        try:
            text = fh.read(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{p}: not a safetensors file (bad JSON header: {exc})") from None
        header = loads_json(text, f"{p}: not a safetensors file (bad JSON header)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (header is not a JSON object)")
    _check_header(p, header, size - 8 - n)
    return header


# bytes per element of the dtypes the safetensors format names
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _check_header(p: Path, header: dict[str, Any], body: int) -> None:
    """Every entry well-formed and backed by the file's bytes, before anything is allocated.

    The format's own rules (which the safetensors library enforces only when the data are
    read): a known dtype, a shape of non-negative ints, ``data_offsets`` ``[begin, end]``
    with ``end - begin`` = elements × item size, the entries tiling the body exactly; and
    ``__metadata__`` a map of strings to strings. So a shape in the header can never ask
    for more memory than the file holds.
    """
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(
                    f"{p}: __metadata__: expected a map of strings to strings, got {info!r}"[:300]
                )
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{p}: tensor {name!r} has a malformed header entry {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise CheckpointError(
                f"{p}: tensor {name!r}: expected a dtype among {sorted(_ITEMSIZE)}, got {dtype!r}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{p}: tensor {name!r} has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise CheckpointError(
                f"{p}: tensor {name!r}: expected data_offsets [begin, end] within the "
                f"{body} data bytes, got {offsets!r}"
            )
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{p}: tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                f"data_offsets {offsets} hold {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise CheckpointError(
                f"{p}: tensor data must tile the body: a gap or overlap at byte {begin}"
            )
        end = stop
    if end != body:
        raise CheckpointError(f"{p}: tensor data end at byte {end}, the body has {body} bytes")


def _bf16_to_f32(raw: bytes, shape: list[int]) -> np.ndarray:
    """Widen little-endian bfloat16 bytes to float32 exactly (bf16 = top half of f32)."""
    u16 = np.frombuffer(raw, dtype="<u2")
    return (u16.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def load_safetensors(
    path: PathLike,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    *,
    strict: bool = True,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """Load every tensor of a safetensors file as NumPy arrays, after validating it.

    expected: name → shape. Every expected name must be present with that shape; with
        ``strict`` (default) a name not in ``expected`` is an error too. All problems are
        reported in one CheckpointError naming the file.
    dtype: if given, every tensor must be floating and is cast to ``dtype`` (a model's
        weights); otherwise tensors keep their stored dtype (bfloat16 becomes float32).
    The header is validated before any tensor data is read.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    header = read_safetensors_header(p)
    infos = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in infos.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{p}: tensor {name!r} has a malformed header entry {info!r}")
    if expected is not None:
        check_tensors(
            {k: tuple(v["shape"]) for k, v in infos.items()}, expected, source=p, strict=strict
        )
    if dtype is not None:
        want = np.dtype(dtype)
        bad = {
            k: v["dtype"]
            for k, v in infos.items()
            if v["dtype"] not in ("F64", "F32", "F16", "BF16")
        }
        if bad:
            raise CheckpointError(f"{p}: expected floating tensors, got {bad}")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(p), framework="numpy") as f:
            for name, info in infos.items():
                if info["dtype"] == "BF16":
                    begin, end = info["data_offsets"]
                    with open(p, "rb") as fh:
                        (n,) = struct.unpack("<Q", fh.read(8))
                        fh.seek(8 + n + begin)
                        arr = _bf16_to_f32(fh.read(end - begin), info["shape"])
                else:
                    # the header's shape is authoritative (safetensors' NumPy reader turns
                    # a 0-d tensor into shape (1,))
                    arr = f.get_tensor(name).reshape(info["shape"])
                out[name] = arr if dtype is None else arr.astype(want, copy=False)
    except SafetensorError as exc:
        raise CheckpointError(f"{p}: cannot read safetensors data: {exc}") from None
    return out


def check_tensors(
    shapes: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: PathLike | str = "state",
    strict: bool = True,
) -> None:
    """Compare found names/shapes with the expected ones; one error listing every problem.

    ``shapes`` maps each found name to its shape, or to an array (its ``.shape`` is used).
    """
    found = {k: tuple(int(n) for n in getattr(s, "shape", s)) for k, s in shapes.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected] if strict else []
    wrong = [
        f"{k}: expected shape {tuple(expected[k])}, got {found[k]}"
        for k in expected
        if k in found and tuple(expected[k]) != found[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong:
        problems.append("mis-shaped tensors [" + "; ".join(wrong) + "]")
    if problems:
        raise CheckpointError(f"{source}: " + ", ".join(problems))


def check_config_sizes(
    config_path: PathLike,
    weights: PathLike,
    dims: Mapping[str, tuple[tuple[str, int], ...]],
    layers: tuple[str, str, int] | None = None,
    *,
    prefix: str = "",
) -> None:
    """Check a config's sizes against the weights file's header, before any allocation.

    dims: tensor name (after ``prefix``) → one ``(config field, value)`` per dimension of
    its shape. layers: ``(name prefix, config field, value)`` — the number of distinct
    ``<name prefix><i>.`` blocks in the file must equal ``value``. Reads only the header,
    so a config claiming ``n_positions = 10**12`` is refused before anything of that size
    is built. Raises CheckpointError naming the config file, the field and both values.
    """
    header = read_safetensors_header(weights)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, info in header.items():
        if key == "__metadata__" or not key.startswith(prefix):
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise CheckpointError(f"{weights}: tensor {key!r} has a malformed shape {shape!r}")
        shapes[key[len(prefix) :]] = tuple(shape)
    for name, fields in dims.items():
        if name not in shapes:
            raise CheckpointError(f"{weights}: missing tensor {prefix + name!r}")
        got = shapes[name]
        if len(got) != len(fields):
            raise CheckpointError(
                f"{weights}: {prefix + name} has shape {got}, expected {len(fields)} dimensions"
            )
        for axis, ((field, value), n) in enumerate(zip(fields, got, strict=True)):
            if n != value:
                raise CheckpointError(
                    f"{config_path}: {field}={value} does not match {weights}: "
                    f"{prefix + name} has {n} along axis {axis} (shape {got})"
                )
    if layers is not None:
        start, field, value = layers
        found = {k[len(start) :].split(".", 1)[0] for k in shapes if k.startswith(start)}
        count = len({int(i) for i in found if i.isdigit()})
        if count != value:
            raise CheckpointError(
                f"{config_path}: {field}={value} does not match {weights}, which holds "
                f"{count} layers ({prefix}{start}<i>.*)"
            )


def save_safetensors_atomic(
    path: PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (name → NumPy/CuPy array) to ``path`` atomically.

    The file is written next to its destination under a temporary name and renamed
    into place (``os.replace``), so a crash leaves either the old file or the new one.
    ``metadata`` is the format's ``__metadata__``: a mapping of strings to strings.
    """
    from safetensors.numpy import save_file

    p = Path(path)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError(f"metadata: expected a mapping of str to str, got {dict(metadata)!r}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: names must be strings, got {name!r}")
        arr = np.asarray(backend.to_numpy(data_of(value)))
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            arr = np.ascontiguousarray(arr)
        if arr.dtype == object:
            raise TypeError(f"tensors[{name!r}]: cannot store dtype object")
        arrays[name] = arr
    return atomic_write(p, lambda tmp: save_file(arrays, tmp, metadata=dict(metadata or {})))


# ---------------------------------------------------------------------------- JSON
def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (``minipeft.io.atomic_write``)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return atomic_write(Path(path), write)


MAX_JSON_DEPTH = 64  # configs nest a few levels; HF's deepest are well under 10
MAX_JSON_BYTES = 64 * 2**20  # a config.json is kilobytes


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion of our own)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads_json(text: str, source: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a depth guard; CheckpointError naming ``source`` on bad input.

    CPython's JSON decoder recurses once per level and stops at the interpreter's
    recursion limit (RecursionError, after ~1000 levels, in bounded time and memory); that
    and any depth beyond ``max_depth`` become a CheckpointError instead of escaping.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: invalid JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(
            f"{source}: JSON nested too deeply (more than {max_depth} levels)"
        ) from None
    depth = _depth(data)
    if depth > max_depth:
        raise CheckpointError(
            f"{source}: JSON nested too deeply: expected at most {max_depth} levels, got {depth}"
        )
    return data


def read_json(path: PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file (missing, invalid, not an object).

    Files over ``MAX_JSON_BYTES`` and JSON nested deeper than ``MAX_JSON_DEPTH`` are
    refused before they can exhaust memory or the stack.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such JSON file")
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{p}: expected a JSON file of at most {MAX_JSON_BYTES} bytes, got {size} bytes"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{p}: invalid JSON: {exc}") from None
    data = loads_json(text, str(p))
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def dataclass_from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    ignored_keys: Collection[str] = (),
    accepted_values: Mapping[str, Collection[Any]] | None = None,
    source: PathLike | str = "config",
) -> T:
    """Build the dataclass ``cls`` from ``data`` under an explicit key policy.

    Each key of ``data`` is exactly one of:
    * a field of ``cls`` — passed to the constructor (which validates the value);
    * in ``accepted_values`` — a setting minipeft does not model but that would change
      the computation; accepted only at the listed values (the ones whose behaviour
      minipeft reproduces), otherwise a CheckpointError;
    * in ``ignored_keys`` — bookkeeping with no effect on the computation (dropped);
    * anything else — a CheckpointError listing the unknown keys: a key we do not know
      might change the model, and silently ignoring it could load a different network.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls: expected a dataclass, got {cls!r}")
    accepted = dict(accepted_values or {})
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(
        k for k in data if k not in fields and k not in accepted and k not in ignored_keys
    )
    if unknown:
        raise CheckpointError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__} "
            f"(fields: {sorted(fields)}; tolerated bookkeeping keys are listed in "
            f"{cls.__name__}'s documentation)"
        )
    for key, allowed in accepted.items():
        if key in data and data[key] not in list(allowed):
            raise CheckpointError(
                f"{source}: {key}={data[key]!r} is not supported by minipeft's "
                f"{cls.__name__} (supported: {list(allowed)!r})"
            )
    kwargs = {k: data[k] for k in fields if k in data}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{source}: {exc}") from None


def read_json_config(
    path: PathLike,
    cls: type[T],
    *,
    ignored_keys: Collection[str] = (),
    accepted_values: Mapping[str, Collection[Any]] | None = None,
) -> T:
    """Read ``path`` (a JSON object) into the dataclass ``cls`` — see ``dataclass_from_dict``."""
    return dataclass_from_dict(
        cls,
        read_json(path),
        ignored_keys=ignored_keys,
        accepted_values=accepted_values,
        source=Path(path),
    )
