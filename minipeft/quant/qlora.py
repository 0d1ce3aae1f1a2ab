"""The 4-bit weight format of QLoRA: packed codes + ``QuantState``, with no dense ``.data``.

Derivation: derivations/qlora_layer.md. ``Weight4bit`` holds a frozen weight as 4-bit codes
(NF4 or FP4, blockwise absmax, optionally double-quantized) and dequantizes it on request:
Ŵ = dequant(packed, state). The layer that carries LoRA adapters over it — ``Linear4bit``,
its fused Function ``Linear4bitFunction``/``linear4bit`` and ``quantize_model`` — lives in
``minipeft.peft.qlora`` (adapters live in ``peft/``); it is re-exported here, lazily, so
``from minipeft.quant.qlora import Linear4bit`` keeps working without ``quant`` importing
``peft`` at import time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from ..backend import Array
from .blockwise import QuantState, dequantize_4bit

# also resolvable here, from minipeft.peft.qlora: Linear4bit, Linear4bitFunction, linear4bit,
# quantize_model (see ``__getattr__`` at the end)
__all__ = [
    "QuantizedWeightError",
    "Weight4bit",
]


class QuantizedWeightError(TypeError):
    """Raised when code asks a 4-bit weight for a dense, writable float matrix."""


class Weight4bit:
    """A frozen 4-bit weight: packed codes + ``QuantState``, shaped like the float weight.

    It is not a ``Parameter`` (it never trains and never gets a gradient) and it has no
    dense ``.data``: reading ``.data`` raises ``QuantizedWeightError``, so merging an adapter
    into it, PiSSA/OLoRA/DoRA initializations and other in-place edits of W₀ fail with a clear
    message instead of writing into codes. ``dequantize()`` returns a float copy of Ŵ.
    """

    requires_grad = False
    grad = None

    def __init__(self, packed: np.ndarray, state: QuantState, *, impl: str = "numba") -> None:
        if not isinstance(state, QuantState):
            raise TypeError(f"state: expected a QuantState, got {type(state).__name__}")
        if len(state.shape) != 2:
            raise ValueError(f"state: expected a 2-D weight, got shape {state.shape}")
        n_bytes = (state.numel + 1) // 2
        if getattr(packed, "dtype", None) != np.uint8 or packed.size != n_bytes:
            raise ValueError(
                f"packed: expected uint8 with {n_bytes} bytes for shape {state.shape}, got "
                f"{getattr(packed, 'dtype', type(packed).__name__)} with "
                f"{getattr(packed, 'size', '?')} items"
            )
        self.packed = packed
        self.quant_state = state
        self.impl = impl

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.quant_state.shape)  # type: ignore[return-value]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.quant_state.numel

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype: the dtype of the float weight that was quantized."""
        return np.dtype(self.quant_state.dtype)

    @property
    def data(self) -> Array:
        st = self.quant_state
        raise QuantizedWeightError(
            f"weight: a {st.quant_type.upper()} 4-bit weight (blocksize {st.blocksize}"
            f"{', double-quantized' if st.nested else ''}) has no dense float .data. Merging "
            "an adapter into it, PiSSA/OLoRA/DoRA initialization and other in-place edits of "
            "W₀ need the full-precision weight; folding s·B·A into 4-bit codes is lossy (W₀ + "
            "ΔW would be re-quantized, an error of the order of one quantization step per "
            "entry, usually larger than ΔW itself). Keep the adapter unmerged, or use "
            ".dequantize() for a float copy of Ŵ."
        )

    def to(self, device: str) -> Weight4bit:
        """The same codes and state with their arrays on ``device`` ("numpy" or "cupy")."""
        packed = backend.to_device(self.packed, device)
        return Weight4bit(packed, self.quant_state.to(device), impl=self.impl)

    def placement(self) -> str:
        return backend.placement(self.packed)

    def dequantize(self, dtype: Any = None) -> Array:
        """Ŵ = code[q]·c_b in the stored layout, as ``dtype`` (default: the weight's dtype)."""
        w = dequantize_4bit(self.packed, self.quant_state, impl=self.impl)
        return w if dtype is None else w.astype(dtype, copy=False)

    @property
    def nbytes(self) -> int:
        """Bytes held for this weight: codes, absmax (and nested constants), codebooks."""
        st = self.quant_state
        total = self.packed.nbytes + st.absmax.nbytes + st.code.nbytes
        if st.state2 is not None:
            total += st.state2.absmax.nbytes + st.state2.code.nbytes + 4  # + float32 offset
        return int(total)

    def __repr__(self) -> str:
        st = self.quant_state
        return (
            f"Weight4bit(shape={self.shape}, quant_type={st.quant_type!r}, "
            f"blocksize={st.blocksize}, double_quant={st.nested})"
        )


# ------------------------------------------------------------------------------ re-export
_MOVED = ("Linear4bit", "Linear4bitFunction", "linear4bit", "quantize_model")


def __getattr__(name: str) -> Any:
    """The QLoRA layer moved to ``minipeft.peft.qlora``; its names still resolve here."""
    if name in _MOVED:
        from ..peft import qlora

        return getattr(qlora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
