"""Blockwise 4-bit absmax quantization, bit-compatible with bitsandbytes 0.50 on CPU.

    x (any shape) → flat (n,) → blocks of B consecutive items (the last may be short)
    c_b   = max_{i∈b} |x_i|                    absmax per block, float32
    s_i   = x_i · fl(1/c_b)                    scaled into [-1, 1] (clamped), float32
    q_i   = nearest level of the codebook      ties to the lower level, float32 midpoints
    byte  = q_{2j} << 4 | q_{2j+1}             first element in the high nibble
    x̂_i  = code[q_i] · c_b                    dequantization, float32, then the dtype

Details that bitsandbytes' CPU path fixes and this module follows so the bytes agree:
a zero block's scale is clamped to 1e-38 (s = 0, no NaN; absmax stored as 0, except a
short last block, which stores the clamped 1e-38); the short last block divides,
s_i = x_i / c_b, where full blocks multiply by the float32 reciprocal; an odd count is
padded with one zero before packing; FP4 levels are searched in stable sorted order
(code 0 before code 8, both zero). See ``derivations/qlora.md``.

``quantize_4bit(x, blocksize=64, quant_type="nf4", double_quant=False)`` returns
``(packed, state)``; ``dequantize_4bit(packed, state)`` inverts it. Both run the Numba
kernels by default; ``impl="reference"`` selects the NumPy reference they equal bit for
bit, ``impl="cuda"`` the CUDA kernels (CuPy arrays).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backend
from ..backend import to_numpy
from ..io import atomic_write
from .codebooks import decision_boundaries, dynamic_map_signed, get_codebook
from .double_quant import DQ_BLOCKSIZE, DoubleQuantState, double_dequantize, double_quantize

__all__ = [
    "QUANT_TYPES",
    "VALID_BLOCKSIZES",
    "QuantState",
    "block_absmax",
    "dequantize_4bit",
    "load_4bit",
    "pack_nibbles",
    "quantize_4bit",
    "save_4bit",
    "scale_blocks",
    "unpack_nibbles",
]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # as bitsandbytes 0.50
QUANT_TYPES = ("nf4", "fp4", "int4")  # int4 is minipeft's linear baseline, not in bnb
_DTYPES = ("float16", "float32", "float64")
_IMPLS = ("reference", "numba", "cuda")
_TINY = np.float32(1e-38)  # bitsandbytes clamps a block's scale to this before 1/c
_FORMAT = "minipeft.quant4/1"


@dataclass
class QuantState:
    """What dequantization needs besides the packed codes.

    absmax: float32 (n_blocks,) per-block constants, or uint8 (n_blocks,) 8-bit codes of
    them when ``state2`` (double quantization) is set. shape, dtype: of the original array.
    code: the (16,) float32 codebook of ``quant_type``.
    """

    absmax: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    code: np.ndarray
    state2: DoubleQuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_scales(self) -> np.ndarray:
        """The float32 absmax per block, reconstructed when double-quantized (computed
        where the state lives)."""
        if self.state2 is None:
            return backend.xp_of(self.absmax).asarray(self.absmax, dtype=np.float32)
        return double_dequantize(self.absmax, self.state2)

    def to(self, device: str) -> QuantState:
        """A copy whose arrays (absmax, code, the nested state's) live on ``device``."""
        return QuantState(
            backend.to_device(self.absmax, device),
            self.shape,
            self.dtype,
            self.blocksize,
            self.quant_type,
            backend.to_device(self.code, device),
            None if self.state2 is None else self.state2.to(device),
        )

    # --------------------------------------------------------------- serialization
    def metadata(self) -> dict[str, Any]:
        """The non-array fields, JSON-serializable."""
        meta: dict[str, Any] = {
            "format": _FORMAT,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "blocksize": self.blocksize,
            "quant_type": self.quant_type,
            "nested": self.nested,
        }
        if self.state2 is not None:
            meta["nested_blocksize"] = self.state2.blocksize
            meta["nested_offset"] = float(self.state2.offset)  # float32 → float64 exactly
        return meta

    def tensors(self) -> dict[str, np.ndarray]:
        """The array fields, by name (for safetensors)."""
        out = {"absmax": np.ascontiguousarray(self.absmax), "code": self.code.copy()}
        if self.state2 is not None:
            out["nested_absmax"] = np.ascontiguousarray(self.state2.absmax)
            out["nested_code"] = self.state2.code.copy()
        return out

    @classmethod
    def from_parts(cls, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> QuantState:
        """Inverse of (:meth:`tensors`, :meth:`metadata`), with validation."""
        if meta.get("format") != _FORMAT:
            raise ValueError(f"metadata: expected format {_FORMAT!r}, got {meta.get('format')!r}")
        state2 = None
        if meta["nested"]:
            state2 = DoubleQuantState(
                absmax=np.asarray(tensors["nested_absmax"], dtype=np.float32),
                offset=np.float32(meta["nested_offset"]),
                code=np.asarray(tensors["nested_code"], dtype=np.float32),
                blocksize=int(meta["nested_blocksize"]),
            )
        state = cls(
            absmax=np.asarray(tensors["absmax"]),
            shape=tuple(int(d) for d in meta["shape"]),
            dtype=str(meta["dtype"]),
            blocksize=int(meta["blocksize"]),
            quant_type=str(meta["quant_type"]),
            code=np.asarray(tensors["code"], dtype=np.float32),
            state2=state2,
        )
        state.validate()
        return state

    def validate(self) -> None:
        """Raise ValueError if the fields are inconsistent."""
        _check_blocksize(self.blocksize)
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.code.shape != (16,):
            raise ValueError(f"code: expected shape (16,), got {self.code.shape}")
        want = np.uint8 if self.nested else np.float32
        if self.absmax.shape != (self.n_blocks,) or self.absmax.dtype != want:
            raise ValueError(
                f"absmax: expected {np.dtype(want).name} of shape ({self.n_blocks},), "
                f"got {self.absmax.dtype} of shape {self.absmax.shape}"
            )
        if self.state2 is not None:
            n2 = -(-self.n_blocks // self.state2.blocksize)
            if self.state2.absmax.shape != (n2,) or self.state2.code.shape != (256,):
                raise ValueError(
                    f"state2: expected absmax ({n2},) and code (256,), got "
                    f"{self.state2.absmax.shape} and {self.state2.code.shape}"
                )


# ------------------------------------------------------------------- building blocks
def _check_blocksize(blocksize: Any) -> None:
    if isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {VALID_BLOCKSIZES}, got {blocksize!r}")


def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """c_b = max |x_i| over each block of the flat float32 array (the last over its items).

    As bitsandbytes: a short last block stores max(c, 1e-38), full blocks store c as is.
    """
    n = flat.size
    full = n - n % blocksize
    am = np.abs(flat[:full]).reshape(-1, blocksize).max(axis=1)  # (n_full,)
    if full < n:
        am = np.concatenate([am, np.maximum(np.abs(flat[full:]).max(keepdims=True), _TINY)])
    return am.astype(np.float32)


def scale_blocks(flat: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """s_i = clamp(x_i · fl(1/c_b), −1, 1); the short last block divides, as bitsandbytes."""
    n = flat.size
    full = n - n % blocksize
    safe = np.maximum(absmax, _TINY)  # a zero block: c clamped to 1e-38, s = 0
    recip = np.float32(1.0) / safe[: full // blocksize]  # fl(1/c_b), float32
    s = np.empty(n, dtype=np.float32)
    s[:full] = (flat[:full].reshape(-1, blocksize) * recip[:, None]).reshape(-1)  # x·fl(1/c)
    if full < n:
        s[full:] = flat[full:] / safe[-1]  # tail block: x / c
    return np.clip(s, np.float32(-1.0), np.float32(1.0))


def pack_nibbles(codes: np.ndarray, pad_code: int) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble; an odd count padded."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([pad_code], dtype=np.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)  # byte = q₀ << 4 | q₁


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 4-bit codes of a packed byte array (high nibble first), where the
    array lives."""
    xp = backend.xp_of(packed)
    packed = xp.asarray(packed, dtype=xp.uint8).reshape(-1)
    codes = xp.empty(packed.size * 2, dtype=xp.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]


def _validate_input(x: Any) -> np.ndarray:
    if not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array, got {type(x).__name__}")
    if np.dtype(x.dtype).name not in _DTYPES:
        raise TypeError(f"x: expected dtype float16, float32 or float64, got {x.dtype}")
    if x.size == 0:
        raise ValueError(f"x: expected a non-empty array, got shape {tuple(x.shape)}")
    return x


def _check_finite(flat: np.ndarray) -> None:
    bad = ~np.isfinite(flat)
    if bad.any():
        raise ValueError(
            f"x: expected finite values, got {int(bad.sum())} non-finite "
            f"(first at flat index {int(np.argmax(bad))})"
        )


# ------------------------------------------------------------------------- public API
def quantize_4bit(
    x: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    *,
    impl: str = "numba",
) -> tuple[Any, QuantState]:
    """Blockwise 4-bit quantization: (packed uint8 ((n+1)//2,), state). [qlora.blockwise_roundtrip]

    x: float16/32/64 array of any shape (computed in float32, as bitsandbytes does after
    ``.float()``). blocksize ∈ {32, …, 4096}; quant_type 'nf4', 'fp4' (bitsandbytes) or
    'int4' (linear baseline). double_quant: quantize the absmax constants too (QLoRA).
    impl: 'numba' (default), 'reference' (NumPy) or 'cuda' (x a CuPy array); all give the
    same bytes.
    """
    _check_blocksize(blocksize)  # (a bool is a ValueError there; 64.0 passes `in`, so:)
    if not isinstance(blocksize, int | np.integer):
        raise TypeError(
            f"blocksize: expected an int in {VALID_BLOCKSIZES}, got {type(blocksize).__name__} "
            f"{blocksize!r}"
        )
    blocksize = int(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
    if not isinstance(double_quant, bool | np.bool_):
        raise TypeError(f"double_quant: expected a bool, got {type(double_quant).__name__}")
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    x = _validate_input(x)
    code = get_codebook(quant_type)
    order, mids = decision_boundaries(code)
    shape, dtype = tuple(int(d) for d in x.shape), np.dtype(x.dtype).name

    if impl == "cuda":
        from ..kernels.cuda import quant4 as cuda_quant4

        packed, absmax = cuda_quant4.quantize_4bit(x, blocksize, mids, order)
        absmax_np = to_numpy(absmax)
    else:
        flat = np.ascontiguousarray(to_numpy(x), dtype=np.float32).reshape(-1)  # (n,)
        _check_finite(flat)
        if impl == "numba":
            from ..kernels.cpu import quant4 as cpu_quant4

            packed, absmax_np = cpu_quant4.quantize_4bit(flat, blocksize, mids, order)
        else:
            absmax_np = block_absmax(flat, blocksize)  # c_b
            s = scale_blocks(flat, absmax_np, blocksize)  # s = x / c_b in [-1, 1]
            bucket = np.searchsorted(mids, s, side="left")  # #{m < s}: ties stay low
            q = order[bucket]  # nearest level's code
            packed = pack_nibbles(q, pad_code=int(order[np.searchsorted(mids, 0.0)]))
    state = QuantState(absmax_np, shape, dtype, blocksize, quant_type, code)
    if double_quant:
        qabs, state2 = double_quantize(absmax_np, DQ_BLOCKSIZE, dynamic_map_signed())
        state = QuantState(qabs, shape, dtype, blocksize, quant_type, code, state2)
    return packed, state


def dequantize_4bit(
    packed: Any, state: QuantState, *, impl: str = "numba", out: np.ndarray | None = None
) -> Any:
    """x̂ = code[q]·c_b (float32 product), reshaped to ``state.shape`` in ``state.dtype``.

    ``out``: a C-contiguous float32 array of ``state.shape`` to write into (``impl="numba"``,
    float32 state). A reused buffer skips the page faults of a fresh allocation, which on
    this project's machines cost as much as the whole dequantization (derivations/qlora.md).
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a QuantState, got {type(state).__name__}")
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    n = state.numel
    n_bytes = (n + 1) // 2
    if getattr(packed, "dtype", None) != np.uint8 or packed.size != n_bytes:
        raise ValueError(
            f"packed: expected uint8 with {n_bytes} bytes for shape {state.shape}, got "
            f"{getattr(packed, 'dtype', type(packed).__name__)} with "
            f"{getattr(packed, 'size', '?')} items"
        )
    scales = state.block_scales()  # c_b, float32 (n_blocks,)
    if backend.placement(packed) == "cupy":
        # on the device: the CUDA kernel, or the array-namespace reference (impl="reference")
        if impl == "reference":
            xp = backend.xp_of(packed)
            q = unpack_nibbles(packed, n)  # (n,) codes
            scale = xp.repeat(scales, state.blocksize)[:n]  # c_b per element
            code = xp.asarray(state.code, dtype=xp.float32)
            return (code[q] * scale).reshape(state.shape).astype(state.dtype, copy=False)
        impl = "cuda"
    elif impl == "cuda":
        raise ValueError("impl: 'cuda' dequantizes device (CuPy) arrays; packed is a NumPy array")
    if impl == "cuda":
        from ..kernels.cuda import quant4 as cuda_quant4

        out = cuda_quant4.dequantize_4bit(packed, scales, state.code, state.blocksize, n)
        return out.reshape(state.shape).astype(state.dtype, copy=False)
    packed_np = to_numpy(packed).reshape(-1)
    if out is not None:
        if impl != "numba" or state.dtype != "float32":
            raise ValueError(
                f"out: needs impl='numba' and a float32 state, got {impl!r}, {state.dtype}"
            )
        if not (
            isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
            and tuple(out.shape) == tuple(state.shape)
        ):  # fmt: skip
            raise ValueError(
                f"out: expected a C-contiguous float32 array of shape {state.shape}, got "
                f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
            )
        from ..kernels.cpu import quant4 as cpu_quant4

        cpu_quant4.dequantize_4bit(
            packed_np, scales, state.code, state.blocksize, n, out=out.reshape(-1)
        )
        return out
    if impl == "numba":
        from ..kernels.cpu import quant4 as cpu_quant4

        out = cpu_quant4.dequantize_4bit(packed_np, scales, state.code, state.blocksize, n)
    else:
        q = unpack_nibbles(packed_np, n)  # (n,) codes
        scale = np.repeat(scales, state.blocksize)[:n]  # c_b per element
        out = state.code[q] * scale  # x̂ = code[q]·c_b, float32
    return out.reshape(state.shape).astype(state.dtype, copy=False)


# ---------------------------------------------------------------------------- files
def save_4bit(path: str | os.PathLike[str], packed: np.ndarray, state: QuantState) -> None:
    """Write packed codes and state to one safetensors file (JSON in its metadata)."""
    from safetensors.numpy import save_file

    state.validate()
    tensors = {"packed": np.ascontiguousarray(to_numpy(packed)), **state.tensors()}
    meta = {"minipeft.quant_state": json.dumps(state.metadata())}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_4bit(path: str | os.PathLike[str]) -> tuple[np.ndarray, QuantState]:
    """Read what :func:`save_4bit` wrote: (packed, state), validated.

    Every field is checked before use — missing tensors or metadata keys, a shape that is
    not a list of non-negative ints, a blocksize that is not an int, non-finite codebooks
    or scales — and raises ValueError naming the file and the field.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_raw = (f.metadata() or {}).get("minipeft.quant_state")
            if meta_raw is None:
                raise ValueError(f"path: {path} has no 'minipeft.quant_state' metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"path: {path} is not a readable safetensors file: {exc}") from None
    try:
        meta = json.loads(meta_raw)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"path: {path}: 'minipeft.quant_state' is not valid JSON") from None
    _check_4bit_parts(path, tensors, meta)
    try:
        state = QuantState.from_parts(tensors, meta)
    except (TypeError, ValueError) as exc:  # from_parts names the field; add the file
        raise type(exc)(f"{path}: {exc}") from None
    packed = tensors["packed"]
    if packed.dtype != np.uint8 or packed.shape != ((state.numel + 1) // 2,):
        raise ValueError(
            f"{path}: packed: expected uint8 ({(state.numel + 1) // 2},), "
            f"got {packed.dtype} {packed.shape}"
        )
    return packed, state


def _check_4bit_parts(path: Any, tensors: dict[str, np.ndarray], meta: Any) -> None:
    """Reject what ``QuantState.from_parts`` would mis-read: missing, mistyped, non-finite."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'minipeft.quant_state' must be a JSON object, got {meta!r}")
    nested = meta.get("nested")
    if not isinstance(nested, bool):
        raise ValueError(f"{path}: metadata 'nested' must be true or false, got {nested!r}")
    keys = ["format", "shape", "dtype", "blocksize", "quant_type", "nested"]
    names = ["packed", "absmax", "code"]
    if nested:
        keys += ["nested_blocksize", "nested_offset"]
        names += ["nested_absmax", "nested_code"]
    missing = [k for k in keys if k not in meta] + [
        f"tensor {n}" for n in names if n not in tensors
    ]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**62 for n in shape
    ):
        raise ValueError(f"{path}: shape must be a list of non-negative ints, got {shape!r}")
    if int(np.prod(np.array(shape, dtype=object), dtype=object)) >= 2**62:
        raise ValueError(f"{path}: shape {shape} has too many elements")
    for key in ("blocksize", "nested_blocksize") if nested else ("blocksize",):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int):
            raise ValueError(f"{path}: {key} must be an int, got {meta[key]!r}")
    for name in names[1:]:
        arr = tensors[name]
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values")
    if nested and not (
        isinstance(meta["nested_offset"], int | float) and np.isfinite(meta["nested_offset"])
    ):
        raise ValueError(
            f"{path}: nested_offset must be a finite number, got {meta['nested_offset']!r}"
        )
