"""Cost of one LoRA layer forward over a mixed-adapter batch vs one shared adapter.

Setting (the issue's): N = 256 rows, in = out = 1024, r = 16, 8 adapters plus "no adapter"
(row ids drawn uniformly from {−1, 0, …, 7}), float32, ONE thread everywhere (BLAS and Numba).

    baseline  y = x·W₀ᵀ;  y += s·(x·Aᵀ)·Bᵀ          one adapter for every row (BLAS; the
              last product accumulates into y with gemm's beta = 1, no temporary)
    mixed     y = x·W₀ᵀ;  y += SGMV(x, rows' own adapters)   (minipeft.peft.serving, numba)
    grouped   the NumPy reference (gather per adapter, BLAS, scatter) for comparison

Ratios are medians of ``--repeats`` timings after a warm-up, measured in one process:
the whole layer (base product included, what a server pays) and the LoRA branch alone.
Goal of the issue: whole-layer ratio mixed / shared ≤ 1.3.

    python benchmarks/bench_mixed_batch.py [--rows 256] [--dim 1024] [--rank 16]
                                           [--adapters 8] [--repeats 30]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy/Numba load their thread pools

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def median_ms(fns: dict, repeats: int) -> dict:
    """Median wall time of each function in ms; the functions take turns within every
    repeat, so a change of machine load affects all of them alike."""
    for fn in fns.values():  # warm-up (JIT compile, caches)
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    import numba

    from minipeft.peft.serving import lora_mixed_delta, lora_mixed_forward, stack_adapters

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    N, d, r, n = args.rows, args.dim, args.rank, args.adapters
    dt = np.float32
    x = rng.standard_normal((N, d)).astype(dt)
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dt)
    adapters = [
        (
            (rng.standard_normal((r, d)) / np.sqrt(d)).astype(dt),
            (rng.standard_normal((d, r)) / np.sqrt(r)).astype(dt),
            2.0,
        )
        for _ in range(n)
    ]
    stack = stack_adapters(adapters)
    ids = rng.integers(-1, n, N)
    A0, B0, s0 = adapters[0]

    from scipy.linalg.blas import get_blas_funcs

    gemm = get_blas_funcs("gemm", (x,))
    B0f = np.asfortranarray(B0)  # (out, r), the layout BLAS reads without a copy

    def shared_layer():
        y = x @ W.T  # (N, out)
        u = x @ A0.T  # (N, r)
        # yᵀ ← s·B·uᵀ + yᵀ in place (BLAS gemm with beta = 1: no (N, out) temporary)
        gemm(s0, B0f, u, trans_b=True, beta=1.0, c=y.T, overwrite_c=True)
        return y

    def shared_branch():
        return s0 * ((x @ A0.T) @ B0.T)

    def mixed_layer():
        return lora_mixed_forward(x, W, stack, ids, impl="numba")

    def mixed_branch():
        return lora_mixed_delta(x, stack, ids, impl="numba")

    def grouped_layer():
        return lora_mixed_forward(x, W, stack, ids, impl="numpy")

    def grouped_branch():
        return lora_mixed_delta(x, stack, ids, impl="numpy")

    # sanity: the timed functions compute what they claim
    ref = grouped_layer()
    err = np.abs(mixed_layer() - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
    want = x @ W.T + s0 * (x @ A0.T) @ B0.T
    err = np.abs(shared_layer() - want).max() / np.abs(want).max()
    assert err < 1e-5, err

    def base_only():
        return x @ W.T

    fns = {
        "base_only": base_only,
        "shared_layer": shared_layer,
        "mixed_layer": mixed_layer,
        "grouped_layer": grouped_layer,
        "shared_branch": shared_branch,
        "mixed_branch": mixed_branch,
        "grouped_branch": grouped_branch,
    }
    t = median_ms(fns, args.repeats)
    print(
        f"mixed batch: N={N} in=out={d} r={r} adapters={n}+none, float32, 1 thread, "
        f"median of {args.repeats}; rows with an adapter: {int((ids >= 0).sum())}/{N}"
    )
    print(f"{'what':<34}{'ms':>9}{'ratio vs shared':>17}")
    rows = [
        ("base x·W₀ᵀ alone", "base_only", "shared_layer"),
        ("layer: shared adapter (baseline)", "shared_layer", "shared_layer"),
        ("layer: mixed, numba SGMV", "mixed_layer", "shared_layer"),
        ("layer: mixed, numpy grouped", "grouped_layer", "shared_layer"),
        ("branch: shared adapter (baseline)", "shared_branch", "shared_branch"),
        ("branch: mixed, numba SGMV", "mixed_branch", "shared_branch"),
        ("branch: mixed, numpy grouped", "grouped_branch", "shared_branch"),
    ]
    for label, key, base in rows:
        print(f"{label:<34}{t[key]:>9.3f}{t[key] / t[base]:>17.2f}")
    goal = t["mixed_layer"] / t["shared_layer"]
    print(f"goal (layer ratio ≤ 1.3): {'met' if goal <= 1.3 else 'NOT met'} ({goal:.2f})")


if __name__ == "__main__":
    main()
