"""One full GPT-2 training step: minipeft (NumPy) vs PyTorch CPU eager, one thread each.

The step, identical on both sides: zero the gradients, forward, next-token cross-entropy
(labels = inputs, shifted inside the loss), backward, one AdamW update of every parameter
(lr 1e-4, PyTorch's defaults otherwise; ``minipeft.optim.AdamW`` vs ``torch.optim.AdamW``).

Model: GPT-2 with 4 layers, n_embd 256, 4 heads, vocab 512, n_positions 128; batch 8 of
T = 128 tokens; float32; dropout off (p = 0) so both sides do the same arithmetic. The
PyTorch side is transformers' ``GPT2LMHeadModel`` (default attention implementation,
``sdpa``) loaded from the checkpoint minipeft writes, so the weights are the same; the
first step's losses are printed side by side as a check.

Threads: OMP/OpenBLAS/MKL set to 1 before NumPy is imported, ``torch.set_num_threads(1)``.
Timing: ``--warmup`` steps, then the median (and min/max) of ``--repeats`` steps, the two
sides alternating step by step (a load change on a shared machine hits both alike); also
the median CPU time of the process per step, which leaves out waiting for a core.

    python benchmarks/bench_train_step.py                 # timing table
    python benchmarks/bench_train_step.py --memory        # + peak RSS, one process per side
    python benchmarks/bench_train_step.py --profile       # cProfile of the minipeft step
    python benchmarks/bench_train_step.py --baseline-rev REV   # + minipeft as of git REV

Before/after (``--baseline-rev``): ``git archive REV minipeft`` is unpacked into a temporary
directory as the package ``minipeft_<sha>`` (minipeft imports itself relatively), so both
versions run in ONE process, taking turns step by step with PyTorch; the table then also
gives the ratio of the two minipeft versions. After the table, ``--profile-top N`` entries
of a cProfile of one more minipeft step are printed (by own time).

Peak memory (``--memory``, Linux): each side runs alone in a fresh process; after its
imports the peak-RSS counter is reset (``/proc/self/clear_refs``), then the model and
optimizer are built and two steps run; we report peak RSS (VmHWM) minus the RSS after the
imports: model, optimizer state, one step's saved activations and temporaries, and
whatever the allocators keep. tracemalloc cannot see PyTorch's allocator, so RSS is the
one measure both sides share. (``ru_maxrss`` would not do: Linux carries it over from the
parent process across fork/exec.)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

CONFIG = dict(
    vocab_size=512,
    n_positions=128,
    n_embd=256,
    n_layer=4,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
)
BATCH, SEQ, LR = 8, 128, 1e-4


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak) in MiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_checkpoint(directory: str) -> np.ndarray:
    """Write a random GPT-2 checkpoint with minipeft; return the token batch."""
    import minipeft
    from minipeft.models import GPT2, GPT2Config

    minipeft.seed(0)
    GPT2(GPT2Config(**CONFIG)).save_pretrained(directory)
    return np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ))


def baseline_package(rev: str, root: str) -> str:
    """Unpack ``minipeft/`` as of git revision ``rev`` into ``root`` as the package
    ``minipeft_<sha>`` and make it importable; return the package name."""
    repo = Path(__file__).resolve().parent.parent
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()
    tar = subprocess.run(
        ["git", "archive", rev, "minipeft"], cwd=repo, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(root, filter="data")
    name = f"minipeft_{sha}"
    os.replace(Path(root) / "minipeft", Path(root) / name)
    sys.path.insert(0, root)
    return name


def profile_text(step, top: int) -> str:
    """cProfile of one call of ``step``: the ``top`` entries by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(top)
    text = stream.getvalue().replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    return f"minipeft step, cProfile (top {top} by own time):\n" + text.strip()


def minipeft_stepper(directory: str, ids: np.ndarray, package: str = "minipeft"):
    GPT2 = importlib.import_module(f"{package}.models").GPT2
    AdamW = importlib.import_module(f"{package}.optim").AdamW

    model = GPT2.from_pretrained(directory).train()
    opt = AdamW(model.parameters(), lr=LR)

    def step() -> float:
        opt.zero_grad()
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_stepper(directory: str, ids: np.ndarray):
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    tids = torch.from_numpy(ids)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(tids, labels=tids).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def time_interleaved(steps: dict, warmup: int, repeats: int) -> tuple[dict, dict, dict]:
    """First-step losses, per-repeat wall times and per-repeat CPU times of this process;
    the sides alternate step by step so that a change in machine load during the run hits
    both alike. On a loaded machine the CPU time leaves out the time spent waiting for a
    core (one thread per side, so it is the step's own compute plus cache effects)."""
    first = {name: step() for name, step in steps.items()}
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return first, times, cpu


def run_memory_side(side: str, directory: str, root: str | None = None) -> dict:
    """In a fresh process: peak RSS of building the model + optimizer and 2 steps.
    ``side``: "torch", or a minipeft package name (a baseline's is found under ``root``)."""
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ))
    # everything each side imports lazily is imported before the baseline is read
    if side == "torch":
        import torch
        import transformers

        _ = (torch.optim.AdamW, transformers.GPT2LMHeadModel)
    else:
        if root:
            sys.path.insert(0, root)
        import numba  # the kernels' compiler, loaded on the first GELU/LayerNorm call

        _ = numba.njit
        for mod in ("models", "optim"):
            importlib.import_module(f"{side}.{mod}")
        try:  # load the compiled kernels (LLVM's JIT state) on tiny inputs, as an import
            ew = importlib.import_module(f"{side}.kernels.cpu.elementwise")
        except ModuleNotFoundError:  # an older baseline without them
            ew = None
        if ew is not None:
            tiny = np.ones((2, 4), dtype=np.float32)
            _, xhat, rstd = ew.layer_norm_fused(tiny, tiny[0], tiny[0], 1e-5)
            ew.layer_norm_backward_fused(tiny, xhat, rstd, tiny[0], (True, True, True))
            ew.gelu_fused(tiny)
            ew.scatter_add_rows(np.zeros_like(tiny), np.arange(2), tiny)
    reset = _reset_peak()
    base, peak_before = _status_mb("VmRSS"), _status_mb("VmHWM")
    if side == "torch":
        step = torch_stepper(directory, ids)
    else:
        step = minipeft_stepper(directory, ids, side)
    step()
    step()
    return {
        "side": side,
        "baseline_mb": base,
        "peak_before_mb": peak_before,
        "peak_mb": _status_mb("VmHWM"),
        "peak_reset": reset,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS per side")
    ap.add_argument("--profile", action="store_true", help="cProfile one minipeft step")
    ap.add_argument("--baseline-rev", help="also time minipeft as of this git revision")
    ap.add_argument("--profile-top", type=int, default=15, help="after the table: top N (0: none)")
    ap.add_argument("--memory-side", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_side:
        print(json.dumps(run_memory_side(args.memory_side, args.dir, args.root)))
        return 0

    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as base_root:
        ids = make_checkpoint(d)
        mp_step = minipeft_stepper(d, ids)
        if args.profile:
            import cProfile
            import pstats

            for _ in range(args.warmup):
                mp_step()
            prof = cProfile.Profile()
            prof.enable()
            mp_step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return 0
        steps = {"minipeft": mp_step}
        if args.baseline_rev:
            base = baseline_package(args.baseline_rev, base_root)
            steps[base.replace("_", "@", 1)] = minipeft_stepper(d, ids, base)
        try:
            steps["torch"] = torch_stepper(d, ids)
        except ImportError as exc:
            print(f"PyTorch/transformers unavailable ({exc}); minipeft only")
        first, times, cpu = time_interleaved(steps, args.warmup, args.repeats)
        prof = profile_text(mp_step, args.profile_top) if args.profile_top else ""
        mem = {}
        if args.memory:
            for side in steps:
                pkg = side.replace("@", "_", 1)  # "minipeft@<sha>" is the package minipeft_<sha>
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--memory-side",
                        pkg,
                        "--dir",
                        d,
                        "--root",
                        base_root,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                mem[side] = json.loads(out.strip().splitlines()[-1])

    shape = f"GPT-2 L={CONFIG['n_layer']} d={CONFIG['n_embd']} H={CONFIG['n_head']} "
    shape += f"V={CONFIG['vocab_size']}, batch {BATCH}×{SEQ}, float32, 1 thread"
    print(f"training step (fwd + loss + bwd + AdamW): {shape}")
    print(f"warm-up {args.warmup}, median of {args.repeats}")
    rows = [("side", "median s", "min s", "max s", "median CPU s", "first loss", "peak MiB")]

    for name in steps:
        m = mem.get(name)
        peak = "-"
        if m:
            peak = f"{m['peak_mb'] - m['baseline_mb']:.0f}"
            if m["peak_mb"] <= m["peak_before_mb"]:
                peak = "≤" + peak  # the imports' own peak was higher: an upper bound
        t = times[name]
        rows.append(
            (name, f"{statistics.median(t):.4f}", f"{min(t):.4f}", f"{max(t):.4f}",
             f"{statistics.median(cpu[name]):.4f}", f"{first[name]:.6f}", peak)
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    med = {name: statistics.median(t) for name, t in times.items()}
    mcpu = {name: statistics.median(t) for name, t in cpu.items()}
    pairs = [(name, "torch") for name in steps if "torch" in steps and name != "torch"]
    pairs += [("minipeft", name) for name in steps if name.startswith("minipeft@")]
    for a, b in pairs:
        print(f"ratio {a}/{b}: {med[a] / med[b]:.2f} (median wall), "
              f"{mcpu[a] / mcpu[b]:.2f} (median CPU)")  # fmt: skip
    if mem:
        print("peak MiB = peak RSS − RSS after imports, each side alone in a fresh process")
    if prof:
        print(prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
