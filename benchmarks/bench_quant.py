"""4-bit kernels vs their baselines, one table of ratios: quantize, dequantize, fused GEMV.

    /work/venv/bin/python benchmarks/bench_quant.py                  # 4096×4096, 7 rounds
    /work/venv/bin/python benchmarks/bench_quant.py --rounds 11 --reference

Everything runs in this one process on one thread (OMP/MKL/OpenBLAS/Numba threads pinned to
1 before the imports, ``torch.set_num_threads(1)``). After one warm-up call of each, the
cases run in interleaved rounds (every case once per round), so a load change on a shared
machine hits all of them alike; each time is the median over rounds with its min–max, each
ratio the median of the per-round ratios with its min–max. Both the thread's CPU time and
the wall time are printed; the ratios use CPU time unless ``--clock wall``: on a shared
machine with more runnable processes than cores, a preemption adds a whole time slice
(milliseconds) to the wall time of whatever is running, which inflates short cases most.

Cases (NF4, blocksize 64, W float32 4096×4096 = 64 MiB):
- quantize: minipeft Numba vs bitsandbytes' CPU path (``F.quantize_4bit``), and vs a
  memory copy of the float32 matrix (``np.copyto`` into a reused buffer: the bandwidth
  limit, quantization must at least read those bytes).
- dequantize: minipeft Numba into a fresh array (what ``dequantize_4bit`` returns) and into
  a reused ``out=`` buffer, vs bitsandbytes (fresh tensor; its CPU op has no ``out``), vs
  the memory copy, and vs the floor of a fresh result: ``torch.empty`` + ``fill_`` of the
  same 64 MiB (page faults + writes: no dequantizer returning a new tensor can beat it).
- GEMV: the fused 4-bit kernel (plain and double-quantized scales) vs NumPy's float32
  ``W @ x``.
``--reference`` adds the NumPy reference quantizer (slow: seconds per call). Not a test:
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

from minipeft.kernels.cpu import gemv4  # noqa: E402
from minipeft.kernels.cpu import quant4 as cpu_quant4  # noqa: E402
from minipeft.quant import dequantize_4bit, quantize_4bit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="W is size × size float32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--reference", action="store_true", help="also time the NumPy quantizer")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="ratios from this thread's CPU time (default: immune to time slices lost to other "
        "processes on a shared machine; memory stalls and page faults still count) or wall time",
    )
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.size, args.size)).astype(np.float32)
    x = rng.standard_normal(args.size).astype(np.float32)
    bs, n = args.blocksize, w.size
    packed, state = quantize_4bit(w, bs, "nf4", impl="numba")
    packed_dq, state_dq = quantize_4bit(w, bs, "nf4", double_quant=True, impl="numba")
    out = np.empty(n, dtype=np.float32)
    dst = np.empty_like(w)

    cases: dict[str, Callable[[], object]] = {
        "quantize minipeft": lambda: quantize_4bit(w, bs, "nf4", impl="numba"),
        "dequantize minipeft": lambda: dequantize_4bit(packed, state, impl="numba"),
        "dequantize minipeft out=": lambda: cpu_quant4.dequantize_4bit(
            packed, state.absmax, state.code, bs, n, out=out
        ),
        "memcpy float32": lambda: np.copyto(dst, w),
        "gemv 4-bit fused": lambda: gemv4.gemv_4bit(packed, state, x),
        "gemv 4-bit fused, dq": lambda: gemv4.gemv_4bit(packed_dq, state_dq, x),
        "gemv numpy float32": lambda: w @ x,
    }
    if args.reference:
        cases["quantize numpy reference"] = lambda: quantize_4bit(w, bs, "nf4")
    try:
        import torch

        torch.set_num_threads(1)
        import bitsandbytes.functional as F

        wt = torch.from_numpy(w)
        tp, qs = F.quantize_4bit(wt, blocksize=bs, quant_type="nf4")
        cases["quantize bitsandbytes"] = lambda: F.quantize_4bit(wt, blocksize=bs, quant_type="nf4")
        cases["dequantize bitsandbytes"] = lambda: F.dequantize_4bit(tp, qs)
        cases["fresh 64 MiB: torch.empty+fill"] = lambda: torch.empty(w.shape).fill_(1.0)
        have_bnb = True
    except ImportError as exc:
        print(f"(bitsandbytes rows left out: {exc})")
        have_bnb = False

    for fn in cases.values():
        fn()  # warm-up: JIT compilation, caches
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    times = cpu if args.clock == "cpu" else wall

    print(
        f"NF4, blocksize {bs}, W {args.size}×{args.size} float32 ({w.nbytes / 2**20:.0f} MiB), "
        f"one thread, {args.rounds} interleaved rounds; GEMV SIMD width {gemv4.simd_width()}; ms"
    )
    print(f"{'case':<32} {'CPU median':>10} {'min':>8} {'max':>8} {'wall median':>12} {'min':>8}")
    for name in cases:
        c, t = cpu[name], wall[name]
        print(
            f"{name:<32} {statistics.median(c) * 1e3:10.2f} {min(c) * 1e3:8.2f} "
            f"{max(c) * 1e3:8.2f} {statistics.median(t) * 1e3:12.2f} {min(t) * 1e3:8.2f}"
        )

    def ratio(num: str, den: str) -> tuple[float, float, float]:
        r = [a / b for a, b in zip(times[num], times[den], strict=True)]  # per round
        return statistics.median(r), min(r), max(r)

    rows: list[tuple[str, str, str, str]] = []  # (label, numerator, denominator, target)
    if have_bnb:
        rows += [
            ("quantize: bnb / minipeft", "quantize bitsandbytes", "quantize minipeft", "≥ 10"),
            ("dequantize: bnb / minipeft", "dequantize bitsandbytes", "dequantize minipeft",
             "≥ 3"),
            ("dequantize: bnb / minipeft out=", "dequantize bitsandbytes",
             "dequantize minipeft out=", "≥ 3"),
            ("dequantize: bnb / fresh-64MiB floor", "dequantize bitsandbytes",
             "fresh 64 MiB: torch.empty+fill", ""),
        ]  # fmt: skip
    rows += [
        ("quantize: minipeft / memcpy", "quantize minipeft", "memcpy float32", "(limit 1)"),
        ("dequantize: minipeft / memcpy", "dequantize minipeft", "memcpy float32", ""),
        ("dequantize out=: minipeft / memcpy", "dequantize minipeft out=", "memcpy float32", ""),
        ("gemv: numpy f32 / fused 4-bit", "gemv numpy float32", "gemv 4-bit fused", "≥ 2"),
        ("gemv: numpy f32 / fused 4-bit dq", "gemv numpy float32", "gemv 4-bit fused, dq", "≥ 2"),
    ]
    if args.reference:
        rows.append(
            ("quantize: numpy ref / minipeft", "quantize numpy reference", "quantize minipeft", "")
        )
    print()
    print(
        f"{'time ratio (' + args.clock + '), per round':<40} "
        f"{'median':>7} {'min':>7} {'max':>7}  target"
    )
    for label, num, den, target in rows:
        m, lo, hi = ratio(num, den)
        print(f"{label:<40} {m:7.2f} {lo:7.2f} {hi:7.2f}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
