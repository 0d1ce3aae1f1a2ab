"""Blockwise NF4 quantize + dequantize throughput: NumPy reference, Numba, bitsandbytes CPU.

    /work/venv/bin/python benchmarks/bench_quant.py            # 4096×4096 float32, 5 repeats
    /work/venv/bin/python benchmarks/bench_quant.py --size 1024 --repeats 3

One thread each (OMP/MKL/torch/Numba threads pinned to 1 before the imports), one warm-up
call, then the median of ``--repeats`` timed calls. Baselines, measured in this process:
the NumPy reference (ratios are speed-ups over it) and a memory copy of the float32 matrix
(``np.copyto``, the bandwidth limit: quantization must at least read those bytes). The
bitsandbytes rows need torch and bitsandbytes and are left out without them. Not a test:
nothing here asserts a timing.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from minipeft.quant import dequantize_4bit, quantize_4bit  # noqa: E402


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (JIT compilation, caches, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="matrix is size × size float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blocksize", type=int, default=64)
    args = ap.parse_args()

    x = np.random.default_rng(0).standard_normal((args.size, args.size)).astype(np.float32)
    bs = args.blocksize
    rows: list[tuple[str, float, float]] = []  # (name, quantize s, dequantize s)

    for kernel in ("numpy", "numba"):
        packed, state = quantize_4bit(x, bs, "nf4", kernel=kernel)
        tq = _median_seconds(lambda k=kernel: quantize_4bit(x, bs, "nf4", kernel=k), args.repeats)
        td = _median_seconds(
            lambda k=kernel, p=packed, s=state: dequantize_4bit(p, s, kernel=k), args.repeats
        )
        rows.append((f"minipeft {kernel}", tq, td))

    try:
        import torch

        torch.set_num_threads(1)
        import bitsandbytes.functional as F

        xt = torch.from_numpy(x)
        tp, qs = F.quantize_4bit(xt, blocksize=bs, quant_type="nf4")
        tq = _median_seconds(
            lambda: F.quantize_4bit(xt, blocksize=bs, quant_type="nf4"), args.repeats
        )
        td = _median_seconds(lambda: F.dequantize_4bit(tp, qs), args.repeats)
        rows.append(("bitsandbytes CPU", tq, td))
    except ImportError as exc:
        print(f"(bitsandbytes rows left out: {exc})")

    dst = np.empty_like(x)
    tcopy = _median_seconds(lambda: np.copyto(dst, x), args.repeats)

    n = x.size
    ref_q, ref_d = rows[0][1], rows[0][2]
    print(f"NF4, blocksize {bs}, {args.size}×{args.size} float32 ({x.nbytes / 2**20:.0f} MiB),")
    print(f"one thread, median of {args.repeats} after a warm-up")
    gbs = x.nbytes / tcopy / 1e9
    print(f"memory copy of the float32 matrix: {tcopy * 1e3:8.2f} ms ({gbs:.1f} GB/s)")
    head = f"{'implementation':<20} {'quant ms':>9} {'dequant ms':>10} {'Melem/s q':>10} "
    head += f"{'× numpy q':>9} {'× numpy dq':>10} {'q / copy':>9} {'dq / copy':>9}"
    print(head)
    for name, tq, td in rows:
        print(
            f"{name:<20} {tq * 1e3:9.2f} {td * 1e3:10.2f} {n / tq / 1e6:10.1f} "
            f"{ref_q / tq:9.2f} {ref_d / td:10.2f} {tq / tcopy:9.1f} {td / tcopy:9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
