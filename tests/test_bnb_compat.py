"""Bit-compatibility with bitsandbytes 0.50 on CPU, and QuantState conversions both ways.

Skipped without torch or bitsandbytes. bitsandbytes' CPU dequantization of a shape with an
odd last dimension goes through ``torch.compile``; dynamo is disabled here so it runs
eagerly (same arithmetic, no compile time).

Dequantized values are compared with bitsandbytes' own PyTorch reference
(``backends.default``) always, and with its C kernel except where that kernel is known to
be wrong: on AVX-512 machines, for blocksize < 2048, a last dimension that is a multiple
of 16 but not of the blocksize (blocks that straddle rows) gets other blocks' absmax
(bitsandbytes 0.50.2; see derivations/qlora.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="bitsandbytes cross-checks need torch")
pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
import bitsandbytes.functional as F  # noqa: E402

from minipeft.quant import codebooks as cb  # noqa: E402
from minipeft.quant.blockwise import block_absmax, dequantize_4bit, quantize_4bit  # noqa: E402
from minipeft.quant.bnb_interop import (  # noqa: E402
    from_bnb,
    from_bnb_quant_state,
    measure_double_quant_artifacts,
    to_bnb,
    to_bnb_quant_state,
)


@pytest.fixture(autouse=True, scope="module")
def _eager_torch():
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def _make(dist: str, shape: tuple[int, ...], seed: int, bs: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dist == "normal":
        x = rng.standard_normal(n)
    elif dist == "uniform":
        x = rng.uniform(-2, 3, n)
    elif dist == "heavy":  # Student-t with 2 degrees of freedom, weight-like scale
        x = rng.standard_t(2, n) * 0.02
    elif dist == "zeros":  # a zero first block and a zero tail
        x = rng.standard_normal(n)
        x[: min(n, bs)] = 0.0
        x[-(n % bs or min(n, bs)) :] = 0.0
    elif dist == "ties":  # values on the float32 midpoints of NF4 (absmax 1 per block)
        _, mids = cb.decision_boundaries(cb.nf4_codebook())
        x = rng.choice(np.concatenate([mids, -mids, [1.0]]), n)
        x[::bs] = 1.0
    else:
        raise AssertionError(dist)
    return x.astype(np.float32).reshape(shape)


SHAPES = [
    (1,),
    (2,),
    (3,),
    (63,),
    (64,),
    (65,),
    (7, 9),
    (127,),
    (129,),
    (32, 32),
    (33, 64),
    (4097,),
]
DISTS = ["normal", "uniform", "heavy", "zeros", "ties"]


def _c_kernel_trusted(shape: tuple[int, ...], bs: int) -> bool:
    last = shape[-1]
    return not (len(shape) > 1 and bs < 2048 and last % 16 == 0 and last % bs != 0)


def assert_equals_bnb_dequant(ours: np.ndarray, tp, qs) -> None:
    """ours equals bnb's PyTorch reference bit for bit, and its C kernel where trusted.

    The C kernel decodes FP4 code 8 as −0.0 (sign · 0), the table (and minipeft) as +0.0:
    against the kernel, values are compared as numbers (−0 == +0)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = F.get_4bit_type(qs.quant_type, device="cpu")
    shape = tuple(qs.shape)
    ref = _dequantize_4bit_compute(tp.reshape(-1), absmax, code, qs.blocksize, shape, qs.dtype)
    assert ours.tobytes() == ref.numpy().reshape(ours.shape).tobytes()
    if _c_kernel_trusted(shape, qs.blocksize) and ours.size > 2:
        # (bnb transposes its output when the packed array has a single byte)
        theirs = F.dequantize_4bit(tp, qs).numpy().reshape(ours.shape)
        np.testing.assert_array_equal(ours, theirs)


def _bnb_quant(x, bs, qt, dq=False):
    return F.quantize_4bit(torch.from_numpy(x), blocksize=bs, quant_type=qt, compress_statistics=dq)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_packed_absmax_dequant_identical(shape, dist, qt):
    for bs in (32, 64, 256):
        x = _make(dist, shape, seed=hash((shape, dist)) % 1000, bs=bs)
        packed, state = quantize_4bit(x, bs, qt)
        tp, qs = _bnb_quant(x, bs, qt)
        np.testing.assert_array_equal(packed, tp.numpy().reshape(-1))
        np.testing.assert_array_equal(state.absmax, qs.absmax.numpy())
        assert_equals_bnb_dequant(dequantize_4bit(packed, state), tp, qs)


@settings(max_examples=30)
@given(
    n=st.integers(3, 3000),
    bs=st.sampled_from([32, 64, 128, 4096]),
    qt=st.sampled_from(["nf4", "fp4"]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_sizes_identical(n, bs, qt, scale, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    packed, state = quantize_4bit(x, bs, qt)
    tp, qs = _bnb_quant(x, bs, qt)
    np.testing.assert_array_equal(packed, tp.numpy().reshape(-1))
    np.testing.assert_array_equal(state.absmax, qs.absmax.numpy())
    assert_equals_bnb_dequant(dequantize_4bit(packed, state), tp, qs)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_half_precision_identical(dtype):
    x = np.random.default_rng(7).standard_normal((40, 50)).astype(dtype)
    packed, state = quantize_4bit(x, 64, "nf4")
    tp, qs = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(packed, tp.numpy().reshape(-1))
    assert F.dequantize_4bit(tp, qs).numpy().dtype == np.dtype(dtype)
    assert_equals_bnb_dequant(dequantize_4bit(packed, state), tp, qs)


@pytest.mark.parametrize("n", [64 * 256 * 2, 64 * 300 + 17, 64 * 5])
def test_double_quant_against_bnb(n):
    """First level identical; the 8-bit constants agree except where the two documented
    artifacts decide (torch's float32 mean; the CPU lookup-table search), and then by one
    level, minipeft's being the nearer; reconstructions equal up to float32 rounding
    wherever the codes agree."""
    x = (np.random.default_rng(n).standard_normal(n) * 0.03).astype(np.float32)
    packed, state = quantize_4bit(x, 64, "nf4", double_quant=True)
    tp, qs = _bnb_quant(x, 64, "nf4", dq=True)
    np.testing.assert_array_equal(packed, tp.numpy().reshape(-1))
    first = block_absmax(x.reshape(-1), 64)
    np.testing.assert_array_equal(_bnb_quant(x, 64, "nf4")[1].absmax.numpy(), first)
    mu_b = np.float32(qs.offset.item())
    assert abs(float(mu_b) - float(state.state2.offset)) <= 2 * np.spacing(mu_b)
    q_b = qs.absmax.numpy()
    differ = q_b != state.absmax
    assert differ.mean() < 0.01
    assert np.all(np.abs(q_b[differ].astype(int) - state.absmax[differ]) == 1)
    ours = state.block_scales().astype(np.float64)
    theirs = F.dequantize_blockwise(qs.absmax, qs.state2).numpy().astype(np.float64) + mu_b
    same = ~differ
    tol = 4 * np.spacing(np.abs(ours[same]).astype(np.float32)).astype(np.float64) + 4 * np.spacing(
        mu_b
    )
    assert np.all(np.abs(ours[same] - theirs[same]) <= tol)


def test_measure_artifacts_small():
    r = measure_double_quant_artifacts(n_tensors=3, sizes=(64 * 256 * 2, 64 * 77 + 5), seed=1)
    assert r["tensors"] == 3
    for k in ("offset_differs", "codes8_differ", "codes8_differ_same_offset", "lut_not_nearest"):
        assert 0.0 <= r[k] <= 1.0
    assert r["offset_ulps_max"] <= 4


# ------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_from_bnb_dequantizes_identically(dq, qt):
    x = np.random.default_rng(8).standard_normal((96, 70)).astype(np.float32)
    tp, qs = _bnb_quant(x, 64, qt, dq)
    packed, state = from_bnb(tp, qs)
    assert state.nested == dq and state.shape == (96, 70) and state.quant_type == qt
    assert_equals_bnb_dequant(dequantize_4bit(packed, state), tp, qs)
    # from the state alone (the packed bytes as bnb stores them)
    state2 = from_bnb_quant_state(qs)
    np.testing.assert_array_equal(state2.block_scales(), state.block_scales())


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_to_bnb_dequantizes_identically(dq, dtype):
    x = np.random.default_rng(9).standard_normal((50, 64)).astype(dtype)
    packed, state = quantize_4bit(x, 128, "nf4", double_quant=dq)
    tp, qs = to_bnb(packed, state)
    assert qs.nested == dq and qs.blocksize == 128 and qs.dtype == getattr(torch, dtype)
    assert_equals_bnb_dequant(dequantize_4bit(packed, state), tp, qs)
    back = from_bnb_quant_state(to_bnb_quant_state(state))
    np.testing.assert_array_equal(back.absmax, state.absmax)
    assert back.shape == state.shape and back.dtype == state.dtype


def test_to_bnb_rejects_what_bnb_lacks():
    _, s64 = quantize_4bit(np.ones(64, np.float64), 64, "nf4")
    with pytest.raises(ValueError, match="dtype"):
        to_bnb_quant_state(s64)
    _, si4 = quantize_4bit(np.ones(64, np.float32), 64, "int4")
    with pytest.raises(ValueError, match="quant_type"):
        to_bnb_quant_state(si4)
    with pytest.raises(TypeError, match="QuantState"):
        from_bnb_quant_state(object())
