"""Mixed-adapter batches: NumPy reference, Numba SGMV and CUDA SGMV all equal the dense rule.

The expected value is computed row by row from the dense update ΔW_a = s_a·B_a·A_a
(y_i = x_i·(W₀ + ΔW_{a(i)})ᵀ), which shares no code with the grouped reference or kernels.
Tolerances: float64 relative 1e-12; float32 relative 2e-5 of the largest |Δy| (the sums
have `in` or `r` terms accumulated in a different order).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.peft.serving import (
    AdapterStack,
    lora_mixed_delta,
    lora_mixed_forward,
    stack_adapters,
)

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def dense_expected(x, adapters, ids):
    """Row by row: Δy_i = x_i·(s·B·A)ᵀ of the row's own adapter, 0 for id −1 (float64)."""
    x64 = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    d_out = adapters[0][1].shape[0]
    out = np.zeros((x64.shape[0], d_out))
    for i, a in enumerate(np.asarray(ids).reshape(-1)):
        if a >= 0:
            A, B, s = adapters[a]
            dW = s * B.astype(np.float64) @ A.astype(np.float64)  # (out, in)
            out[i] = dW @ x64[i]
    return out.reshape((*x.shape[:-1], d_out))


def assert_close(got, want, dtype):
    got = np.asarray(got, dtype=np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    err = np.abs(got - want).max(initial=0.0) / scale
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@st.composite
def mixed_batches(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n_adapters = draw(st.integers(1, 4))
    d_in = draw(st.integers(1, 24))
    d_out = draw(st.integers(1, 24))
    ranks = draw(st.lists(st.integers(1, 7), min_size=n_adapters, max_size=n_adapters))
    n_rows = draw(st.integers(0, 37))
    kind = draw(st.sampled_from(["mixed", "none", "one"]))
    if kind == "none":  # every row without adapter
        ids = [-1] * n_rows
    elif kind == "one":  # every row with the same adapter
        ids = [draw(st.integers(0, n_adapters - 1))] * n_rows
    else:
        ids = draw(st.lists(st.integers(-1, n_adapters - 1), min_size=n_rows, max_size=n_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    adapters = [
        (
            rng.standard_normal((r, d_in)).astype(dtype),
            rng.standard_normal((d_out, r)).astype(dtype),
            float(rng.uniform(0.1, 4.0)),
        )
        for r in ranks
    ]
    x = rng.standard_normal((n_rows, d_in)).astype(dtype)
    return x, adapters, np.asarray(ids, dtype=np.int64), dtype


@given(mixed_batches())
def test_reference_and_numba_equal_dense_rule(batch):
    x, adapters, ids, dtype = batch
    stack = stack_adapters(adapters)
    want = dense_expected(x, adapters, ids)
    for impl in ("numpy", "numba"):
        got = lora_mixed_delta(x, stack, ids, impl=impl)
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, dtype)


def test_rows_without_adapter_are_exactly_zero():
    rng = np.random.default_rng(0)
    adapters = [(rng.standard_normal((3, 5)), rng.standard_normal((4, 3)), 2.0)]
    stack = stack_adapters(adapters)
    x = rng.standard_normal((6, 5))
    ids = np.array([-1, 0, -1, 0, 0, -1])
    for impl in ("numpy", "numba"):
        dy = lora_mixed_delta(x, stack, ids, impl=impl)
        assert np.all(dy[ids == -1] == 0.0)
        assert np.all(np.abs(dy[ids == 0]) > 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_padding_to_larger_rank_is_exact(dtype):
    """Zero rows of A and zero columns of B add exactly nothing."""
    rng = np.random.default_rng(1)
    adapters = [
        (rng.standard_normal((r, 9)).astype(dtype), rng.standard_normal((7, r)).astype(dtype), 0.5)
        for r in (2, 5)
    ]
    x = rng.standard_normal((11, 9)).astype(dtype)
    ids = rng.integers(-1, 2, 11)
    tight = stack_adapters(adapters)
    loose = stack_adapters(adapters, r_max=12)
    assert loose.r_max == 12 and np.all(loose.A[0, 2:] == 0) and np.all(loose.B[1][:, 5:] == 0)
    for impl in ("numpy", "numba"):
        a = lora_mixed_delta(x, tight, ids, impl=impl)
        b = lora_mixed_delta(x, loose, ids, impl=impl)
        assert_close(b, dense_expected(x, adapters, ids), dtype)
        assert_close(a, dense_expected(x, adapters, ids), dtype)


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_forward_with_sequences_and_bias(impl):
    """x (B, T, in) with one id per sequence, as PEFT's adapter_names; plus W₀ and a bias."""
    rng = np.random.default_rng(2)
    adapters = [(rng.standard_normal((4, 6)), rng.standard_normal((5, 4)), 1.5) for _ in range(3)]
    stack = stack_adapters(adapters)
    W = rng.standard_normal((5, 6))
    b = rng.standard_normal(5)
    x = rng.standard_normal((4, 3, 6))  # (B, T, in)
    seq_ids = np.array([2, -1, 0, 2])
    y = lora_mixed_forward(x, W, stack, seq_ids, b, impl=impl)
    want = x @ W.T + b + dense_expected(x, adapters, np.repeat(seq_ids[:, None], 3, axis=1))
    assert y.shape == (4, 3, 5)
    assert_close(y, want, np.float64)


def test_large_tiles_and_odd_ranks_numba():
    """Full 4-row tiles with ranks that are not multiples of 2 or 4 (the kernel's remainders)."""
    rng = np.random.default_rng(3)
    adapters = [
        (rng.standard_normal((r, 33)), rng.standard_normal((17, r)), 0.7) for r in (1, 3, 5, 6, 8)
    ]
    x = rng.standard_normal((64, 33))
    ids = rng.integers(-1, 5, 64)
    got = lora_mixed_delta(x, stack_adapters(adapters), ids, impl="numba")
    assert_close(got, dense_expected(x, adapters, ids), np.float64)


def test_bad_inputs_raise_with_the_argument_name():
    rng = np.random.default_rng(4)
    stack = stack_adapters([(rng.standard_normal((2, 3)), rng.standard_normal((4, 2)), 1.0)])
    x = rng.standard_normal((5, 3))
    with pytest.raises(ValueError, match="adapter_ids"):
        lora_mixed_delta(x, stack, np.array([0, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="adapter_ids"):
        lora_mixed_delta(x, stack, np.array([0, -2, 0, 0, 0]))
    with pytest.raises(ValueError, match="adapter_ids"):
        lora_mixed_delta(x, stack, np.zeros(4, dtype=int))
    with pytest.raises(TypeError, match="adapter_ids"):
        lora_mixed_delta(x, stack, np.zeros(5))
    with pytest.raises(ValueError, match="x"):
        lora_mixed_delta(rng.standard_normal((5, 4)), stack, np.zeros(5, dtype=int))
    with pytest.raises(TypeError, match="x"):
        lora_mixed_delta(x.astype(np.float32), stack, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="impl"):
        lora_mixed_delta(x, stack, np.zeros(5, dtype=int), impl="fast")
    with pytest.raises(ValueError, match="weight"):
        lora_mixed_forward(x, np.zeros((3, 4)), stack, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="adapters"):
        stack_adapters([(np.zeros((2, 3)), np.zeros((4, 3)), 1.0)])
    with pytest.raises(ValueError, match="adapters"):
        pair = [
            (np.zeros((2, 3)), np.zeros((4, 2)), 1.0),
            (np.zeros((2, 5)), np.zeros((4, 2)), 1.0),
        ]
        stack_adapters(pair)
    with pytest.raises(ValueError, match="r_max"):
        stack_adapters([(np.zeros((2, 3)), np.zeros((4, 2)), 1.0)], r_max=1)
    with pytest.raises(TypeError, match="stack"):
        lora_mixed_delta(x, (stack.A, stack.B), np.zeros(5, dtype=int))


def test_numba_path_without_jit():
    """The same kernels run as plain Python under NUMBA_DISABLE_JIT=1 and give the same values."""
    script = textwrap.dedent(
        """
        import numpy as np
        from minipeft.peft.serving import lora_mixed_delta, stack_adapters
        rng = np.random.default_rng(5)
        ads = [(rng.standard_normal((r, 7)), rng.standard_normal((6, r)), 0.3 * r)
               for r in (1, 4, 3)]
        x = rng.standard_normal((13, 7)); ids = rng.integers(-1, 3, 13)
        got = lora_mixed_delta(x, stack_adapters(ads), ids, impl="numba")
        want = np.zeros((13, 6))
        for i, a in enumerate(ids):
            if a >= 0:
                A, B, s = ads[a]
                want[i] = (s * B @ A) @ x[i]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-12, err
        import numba
        assert numba.config.DISABLE_JIT
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: CUDA SGMV not compared")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        pytest.skip(f"CuPy sees no CUDA device ({exc}): CUDA SGMV not compared")
    if n < 1:
        pytest.skip("CuPy sees no CUDA device: CUDA SGMV not compared")
    return cupy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernel_equals_dense_rule(dtype):
    cupy = _cupy_or_skip()
    rng = np.random.default_rng(6)
    adapters = [
        (
            rng.standard_normal((r, 70)).astype(dtype),
            rng.standard_normal((300, r)).astype(dtype),
            0.9,
        )
        for r in (1, 8, 5, 16)
    ]
    x = rng.standard_normal((45, 70)).astype(dtype)
    ids = rng.integers(-1, 4, 45)
    stack = stack_adapters(adapters)
    parts = (stack.A, stack.B, stack.scaling, stack.ranks, stack.Bt)
    dstack = AdapterStack(*(cupy.asarray(a) for a in parts))
    got = lora_mixed_delta(cupy.asarray(x), dstack, cupy.asarray(ids), impl="cuda")
    assert_close(cupy.asnumpy(got), dense_expected(x, adapters, ids), dtype)


def test_peft_adapter_names_matches():
    """HF PEFT's mixed-batch forward (adapter_names, "__base__" = none) on a tiny Linear."""
    torch = pytest.importorskip("torch", reason="torch not installed: PEFT cross-check skipped")
    peft = pytest.importorskip("peft", reason="peft not installed: PEFT cross-check skipped")

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=True)).double()
    cfg = dict(target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, **cfg), "t0")
    model.add_adapter("t1", peft.LoraConfig(r=3, lora_alpha=3, **cfg))
    model.eval()
    layer = model.base_model.model[0]
    adapters = [
        (
            layer.lora_A[n].weight.detach().numpy(),
            layer.lora_B[n].weight.detach().numpy(),
            float(layer.scaling[n]),
        )
        for n in ("t0", "t1")
    ]
    x = torch.randn(5, 6, dtype=torch.float64)
    names = ["t1", "__base__", "t0", "t1", "__base__"]
    with torch.no_grad():
        want = model(x, adapter_names=names).numpy()
    ids = np.array([{"t0": 0, "t1": 1, "__base__": -1}[n] for n in names])
    y = lora_mixed_forward(
        x.numpy(),
        layer.base_layer.weight.detach().numpy(),
        stack_adapters(adapters),
        ids,
        layer.base_layer.bias.detach().numpy(),
    )
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_non_contiguous_inputs_and_out_accumulation(impl):
    """x as a strided view, ids as a reversed view; `out` is accumulated into in place."""
    rng = np.random.default_rng(7)
    adapters = [(rng.standard_normal((3, 5)), rng.standard_normal((4, 3)), 0.8) for _ in range(2)]
    stack = stack_adapters(adapters)
    x = rng.standard_normal((10, 10))[:, ::2]  # (10, 5), not contiguous
    ids = rng.integers(-1, 2, 20)[::-2]  # (10,), negative stride
    base = rng.standard_normal((10, 4))
    out = base.copy()
    res = lora_mixed_delta(x, stack, ids, impl=impl, out=out)
    assert res is not None and np.shares_memory(res, out)
    assert_close(out - base, dense_expected(x, adapters, ids), np.float64)
    with pytest.raises(ValueError, match="out"):
        lora_mixed_delta(x, stack, ids, impl=impl, out=np.zeros((10, 8))[:, ::2])
    with pytest.raises(ValueError, match="out"):
        lora_mixed_delta(x, stack, ids, impl=impl, out=np.zeros((10, 3)))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_layer_mixed_forward_matches_per_adapter_forward(kind):
    """A LoraLayer (Linear or GPT-2 Conv1D base) over a mixed batch equals running each row
    through the layer with that row's adapter active (or disabled for "__base__")."""
    from minipeft.autograd.tensor import Tensor, no_grad
    from minipeft.backend import dtype_policy
    from minipeft.nn.conv1d import Conv1D
    from minipeft.nn.layers import Linear
    from minipeft.peft.lora import LoraLayer
    from minipeft.peft.serving import lora_layer_mixed_forward

    with dtype_policy("float64"):
        base = Linear(6, 5) if kind == "linear" else Conv1D(6, 5)
        layer = LoraLayer(base)
        layer.add_adapter("t0", 2, 4.0, init_lora_weights=False)
        layer.add_adapter("t1", 3, 3.0, init_lora_weights=False, use_rslora=True)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 6))  # (B, T, in)
    names = ["t1", "__base__", "t0", "t1"]
    y = lora_layer_mixed_forward(layer, x, names)
    want = np.empty((4, 3, 5))
    with no_grad():
        for b, n in enumerate(names):
            if n == "__base__":
                with layer.disable_adapters():
                    want[b] = layer(Tensor(x[b])).data
            else:
                layer.set_adapter(n)
                want[b] = layer(Tensor(x[b])).data
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="adapter_names"):
        lora_layer_mixed_forward(layer, x, ["t0", "nope", "t0", "t0"])


def test_numba_kernel_with_two_threads():
    """Tiles run in parallel under prange; each tile owns its rows, so two threads agree."""
    numba = pytest.importorskip("numba")
    if numba.config.DISABLE_JIT or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has fewer than two threads here (or JIT is disabled)")
    rng = np.random.default_rng(9)
    adapters = [(rng.standard_normal((r, 40)), rng.standard_normal((30, r)), 1.0) for r in (4, 7)]
    x = rng.standard_normal((50, 40))
    ids = rng.integers(-1, 2, 50)
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        got = lora_mixed_delta(x, stack_adapters(adapters), ids, impl="numba")
    finally:
        numba.set_num_threads(old)
    assert_close(got, dense_expected(x, adapters, ids), np.float64)
