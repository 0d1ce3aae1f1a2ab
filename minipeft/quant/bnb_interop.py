"""Conversion to and from bitsandbytes ``QuantState`` (needs torch and bitsandbytes).

    packed, state = quantize_4bit(w)                   # minipeft, NumPy
    tpacked, qs = to_bnb(packed, state)                # torch uint8 ((n+1)//2, 1), QuantState
    bitsandbytes.functional.dequantize_4bit(tpacked, qs)   # same values as dequantize_4bit
    packed2, state2 = from_bnb(tpacked, qs)            # back

A bitsandbytes state with double quantization carries ``offset`` (μ) and ``state2``
(absmax₂, the 256-entry map, blocksize 256); the conversions copy them unchanged, so a
converted state dequantizes to the same float32 values on either side.

:func:`measure_double_quant_artifacts` counts how often bitsandbytes' CPU path and
minipeft's double quantization differ, and why (``derivations/qlora.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .blockwise import QuantState, block_absmax, dequantize_4bit, quantize_4bit
from .double_quant import DoubleQuantState, quantize_blockwise_8bit

__all__ = [
    "from_bnb",
    "from_bnb_quant_state",
    "measure_double_quant_artifacts",
    "roundtrip_equal",
    "to_bnb",
    "to_bnb_quant_state",
]

_BNB_DTYPES = ("float16", "float32")  # bfloat16 has no NumPy dtype; float64 not in bnb


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bitsandbytes interop needs torch: pip install 'minipeft[crosscheck]'"
        ) from exc
    return torch


def to_bnb_quant_state(state: QuantState) -> Any:
    """A ``bitsandbytes.functional.QuantState`` (CPU tensors) equivalent to ``state``."""
    torch = _torch()
    from bitsandbytes.functional import QuantState as BnbQuantState

    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a minipeft QuantState, got {type(state).__name__}")
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(
            f"state.quant_type: bitsandbytes has nf4 and fp4, got {state.quant_type!r}"
        )
    if state.dtype not in _BNB_DTYPES:
        raise ValueError(f"state.dtype: bitsandbytes takes {_BNB_DTYPES}, got {state.dtype!r}")
    state.validate()
    dtype = getattr(torch, state.dtype)
    kwargs: dict[str, Any] = {}
    if state.state2 is not None:
        s2 = state.state2
        kwargs["offset"] = torch.tensor(np.float32(s2.offset))  # 0-dim float32, as bnb
        kwargs["state2"] = BnbQuantState(
            absmax=torch.from_numpy(s2.absmax.astype(np.float32, copy=True)),
            code=torch.from_numpy(s2.code.astype(np.float32, copy=True)),
            blocksize=s2.blocksize,
            dtype=torch.float32,
        )
    return BnbQuantState(
        absmax=torch.from_numpy(np.array(state.absmax, copy=True)),
        shape=torch.Size(state.shape),
        code=torch.from_numpy(state.code.astype(np.float32, copy=True)),
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=dtype,
        **kwargs,
    )


def from_bnb_quant_state(qs: Any) -> QuantState:
    """A minipeft :class:`QuantState` from a bitsandbytes 4-bit ``QuantState``."""
    torch = _torch()
    for name in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype"):
        if not hasattr(qs, name):
            raise TypeError(f"qs: expected a bitsandbytes QuantState, missing {name!r}")
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"qs.quant_type: expected 'nf4' or 'fp4', got {qs.quant_type!r}")
    dtype = str(qs.dtype).removeprefix("torch.")
    if dtype not in _BNB_DTYPES:
        raise ValueError(f"qs.dtype: expected one of {_BNB_DTYPES}, got {dtype!r}")
    state2 = None
    absmax = qs.absmax.detach().cpu().numpy()
    if getattr(qs, "nested", False):
        s2 = qs.state2
        state2 = DoubleQuantState(
            absmax=s2.absmax.detach().cpu().to(torch.float32).numpy().copy(),
            offset=np.float32(qs.offset.detach().cpu().item()),
            code=s2.code.detach().cpu().to(torch.float32).numpy().copy(),
            blocksize=int(s2.blocksize),
        )
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    state = QuantState(
        absmax=absmax.copy(),
        shape=tuple(int(d) for d in qs.shape),
        dtype=dtype,
        blocksize=int(qs.blocksize),
        quant_type=str(qs.quant_type),
        code=qs.code.detach().cpu().to(torch.float32).numpy().copy(),
        state2=state2,
    )
    state.validate()
    return state


def to_bnb(packed: np.ndarray, state: QuantState) -> tuple[Any, Any]:
    """(packed as torch uint8 ((n+1)//2, 1), QuantState): bitsandbytes' layout."""
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1, 1).copy())
    return t, to_bnb_quant_state(state)


def from_bnb(packed: Any, qs: Any) -> tuple[np.ndarray, QuantState]:
    """(packed as NumPy uint8 ((n+1)//2,), minipeft QuantState) from bitsandbytes' pair."""
    arr = packed.detach().cpu().contiguous().view(-1)
    if str(arr.dtype) != "torch.uint8":
        raise ValueError(f"packed: expected torch.uint8 storage, got {arr.dtype}")
    return arr.numpy().copy(), from_bnb_quant_state(qs)


def measure_double_quant_artifacts(
    n_tensors: int = 200, sizes: tuple[int, ...] = (64 * 256 * 4, 64 * 1000 + 17), seed: int = 0
) -> dict[str, float]:
    """Count how often bitsandbytes' CPU double quantization differs from minipeft's.

    For Gaussian weight tensors of the given sizes (scaled by random factors), quantize
    with double quantization on both sides. The first level (packed codes, float32
    absmax) always agrees. Reported:

    * ``offset_differs``: fraction of tensors whose μ differs (torch's float32 mean vs a
      float64 sum rounded once), and ``offset_ulps_max``: the largest difference in ulp;
    * ``codes8_differ``: fraction of 8-bit absmax codes that differ;
    * ``codes8_differ_same_offset``: the same, counted only on tensors where μ agrees —
      the lookup-table search alone; ``lut_not_nearest``: of those differing codes, the
      fraction where bitsandbytes' code is farther from the value than minipeft's;
    * ``codes8_flipped_by_offset``: on tensors where μ differs, the fraction of exactly
      nearest codes that change when bitsandbytes' μ replaces minipeft's — the mean alone;
    * ``recon_max_rel``: max |ĉ_bnb − ĉ_minipeft| / ĉ over all constants.
    """
    torch = _torch()
    import bitsandbytes.functional as F

    rng = np.random.default_rng(seed)
    n_t = n_off = n_codes = n_diff = n_codes_same = n_diff_same = n_farther = 0
    n_codes_off = n_flip_off = 0
    off_ulps = 0.0
    recon_rel = 0.0
    for t in range(n_tensors):
        n = sizes[t % len(sizes)]
        w = (rng.standard_normal(n) * rng.uniform(0.005, 0.2)).astype(np.float32)
        packed, st = quantize_4bit(w, 64, "nf4", double_quant=True)
        tp, qs = F.quantize_4bit(
            torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        if not np.array_equal(packed, tp.numpy().reshape(-1)):
            raise RuntimeError("first-level 4-bit codes differ from bitsandbytes'")
        q_b = qs.absmax.numpy()
        off_b = np.float32(qs.offset.item())
        n_t += 1
        same_off = off_b == st.state2.offset
        if not same_off:
            n_off += 1
            off_ulps = max(
                off_ulps, abs(float(off_b) - float(st.state2.offset)) / float(np.spacing(off_b))
            )
            # the mean alone: minipeft's exact search with bnb's μ instead of its own
            first = block_absmax(w.reshape(-1), 64)
            q_mu, _ = quantize_blockwise_8bit(first - off_b, st.state2.code, 256)
            n_codes_off += q_mu.size
            n_flip_off += int((q_mu != st.absmax).sum())
        diff = q_b != st.absmax
        n_codes += diff.size
        n_diff += int(diff.sum())
        if same_off:
            n_codes_same += diff.size
            n_diff_same += int(diff.sum())
            if diff.any():
                # the scaled value both searches saw: s = fl32(c − μ) / absmax₂
                first = block_absmax(w.reshape(-1), 64)  # c, float32
                a2 = np.repeat(np.maximum(st.state2.absmax, np.float32(1e-38)), 256)
                s = ((first - st.state2.offset) / a2[: first.size]).astype(np.float64)
                code = st.state2.code.astype(np.float64)
                d_ours = np.abs(s[diff] - code[st.absmax[diff]])
                d_bnb = np.abs(s[diff] - code[q_b[diff]])
                n_farther += int((d_bnb > d_ours).sum())
        ours = st.block_scales().astype(np.float64)
        theirs = F.dequantize_blockwise(qs.absmax, qs.state2).numpy().astype(np.float64) + float(
            off_b
        )
        recon_rel = max(recon_rel, float(np.max(np.abs(ours - theirs) / np.abs(ours))))
    return {
        "tensors": float(n_t),
        "offset_differs": n_off / n_t,
        "offset_ulps_max": off_ulps,
        "codes8_differ": n_diff / max(n_codes, 1),
        "codes8_differ_same_offset": n_diff_same / max(n_codes_same, 1),
        "codes8_flipped_by_offset": n_flip_off / max(n_codes_off, 1),
        "lut_not_nearest": n_farther / max(n_diff_same, 1),
        "recon_max_rel": recon_rel,
    }


def roundtrip_equal(packed: np.ndarray, state: QuantState) -> bool:
    """True when bitsandbytes dequantizes the converted pair to minipeft's values, bit for bit."""
    import bitsandbytes.functional as F

    tp, qs = to_bnb(packed, state)
    theirs = F.dequantize_4bit(tp, qs).numpy().reshape(-1)
    ours = np.asarray(dequantize_4bit(packed, state)).reshape(-1)
    return bool(np.array_equal(theirs, ours))
