"""``python -m minipeft gpu-check``: the GPU half, proven on a GPU in one command.

When CuPy sees a CUDA device it runs, within a time budget (5 minutes by default):

1. **the tests against the real CuPy** — every backend-parametrized test with the ``cupy``
   backend (the op table, the device training steps, save/load), the CUDA kernels against
   their NumPy references (``cuda`` tests), and the notebooks on the device; a source
   checkout is needed for this part (the tests are not installed with the package);
2. **a table of figures**, each measured on the device with CUDA events, median of several
   repeats after a warm-up:

   - NF4 dequantize (4096 × 4096, blocksize 64) and the fused 4-bit GEMV as a fraction of
     the device's measured copy bandwidth (a device-to-device copy: read + write);
     goals ≥ 70 % and ≥ 60 %;
   - the mixed-adapter batch (SGMV kernels, 8 adapters + rows without one) against one
     shared adapter (two cuBLAS products); goal ≤ 1.3×;
   - a GPT-2 LoRA training step (4 layers, d = 256, batch 8 × 128, AdamW) against PyTorch
     CUDA eager + HF PEFT on the same device; goal ≤ 1.5× (needs torch with CUDA, peft and
     transformers; otherwise the row says why it is missing).

The report is printed and written to ``--out`` (``gpu-check.json`` and ``gpu-check.md``).
Without a device it prints one line saying why and exits with status 2. Where ``import
cupy`` finds the test suite's strict stand-in (``PYTHONPATH=tests/standin``) the same code
runs at tiny sizes without the tests: a smoke test of this command on machines without a
GPU, whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: where the tests live in a source checkout
REPO = Path(__file__).resolve().parents[2]
TEST_FILES = [
    "tests/test_ops.py",
    "tests/test_device.py",
    "tests/test_blockwise.py",
    "tests/test_gemv4.py",
    "tests/test_serving.py",
    "tests/test_notebooks_device.py",
]
GOALS = {"dequantize": 0.70, "gemv": 0.60, "sgmv": 1.3, "gpt2_lora_step": 1.5}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gpu-check",
        help="on a machine with a GPU: the tests on CuPy and the GPU figures",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--out", default="results/gpu-check", help="report directory")
    p.add_argument("--skip-tests", action="store_true", help="only the table of figures")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds for the tests")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per figure")
    p.set_defaults(func=main)


def device_problem() -> str | None:
    """None when CuPy sees a CUDA device, else one line saying why not."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: pip install 'minipeft[gpu]' on a machine with a GPU"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # the CUDA driver or runtime is unusable
        return f"CUDA is unusable: {type(exc).__name__}: {exc}"
    return None if n > 0 else "CuPy sees no CUDA device"


def main(args: argparse.Namespace) -> int:
    from ..io import check_directory_target
    from . import argument

    with argument("--out"):  # before any computing
        check_directory_target(args.out, "--out")
    problem = device_problem()
    if problem is not None:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    import cupy

    from .. import backend

    backend.set_backend("cupy")
    standin = bool(getattr(cupy, "STANDIN", False))
    report: dict[str, Any] = {"device": _device_name(cupy), "standin": standin}
    report["platform"] = f"{platform.python_version()}, CuPy {cupy.__version__}"
    if args.skip_tests or standin:
        report["tests"] = {"skipped": "--skip-tests" if args.skip_tests else "stand-in run"}
    else:
        report["tests"] = _run_tests(args.time_limit)
    report["figures"] = _figures(cupy, smoke=standin, repeats=2 if standin else args.repeats)
    text = _render(report)
    print(text)
    with argument("--out"):
        _write(Path(args.out), report, text)
    failed = report["tests"].get("failed", 0) or report["tests"].get("error")
    return 1 if failed else 0


def _device_name(cupy: Any) -> str:
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props.get("name", b"?")
    return name.decode() if isinstance(name, bytes) else str(name)


# ---------------------------------------------------------------------------- the tests
def _run_tests(limit: float) -> dict[str, Any]:
    """The device tests against the real CuPy, in a subprocess, within ``limit`` seconds."""
    files = [f for f in TEST_FILES if (REPO / f).is_file()]
    if not files:
        return {"error": f"no tests under {REPO / 'tests'}: run from a source checkout"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-k", "cupy or cuda or runs_on_the_device", *files]  # fmt: skip
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"the tests did not finish within {limit:.0f} s", "command": cmd}
    text = out.stdout + out.stderr
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text)}
    return {
        **counts,
        "exit": out.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "command": " ".join(cmd),
        "tail": text.strip().splitlines()[-25:],
    }


# ---------------------------------------------------------------------------- the figures
def _timer(cupy: Any, fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` on the device (CUDA events), after one warm-up call."""
    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


def _figures(cupy: Any, *, smoke: bool, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, fn in (
        ("bandwidth", _bandwidth_rows),
        ("sgmv", _sgmv_row),
        ("gpt2_lora_step", _gpt2_row),
    ):
        try:
            rows += fn(cupy, smoke, repeats)
        except Exception as exc:  # a figure that cannot be measured says why, in its row
            rows.append({"figure": name, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def _bandwidth_rows(cupy: Any, smoke: bool, repeats: int) -> list[dict[str, Any]]:
    from ..kernels.cpu.gemv4 import gemv_4bit
    from ..quant.blockwise import dequantize_4bit, quantize_4bit

    side = 256 if smoke else 4096
    n = side * side
    rng = np.random.default_rng(0)
    w = cupy.asarray(rng.standard_normal((side, side)).astype(np.float32))
    packed, state = quantize_4bit(w, 64, "nf4", impl="cuda")
    dev_state = state.to("cupy")
    x = cupy.asarray(rng.standard_normal(side).astype(np.float32))
    src = cupy.empty(4 * n, dtype=cupy.uint8)
    dst = cupy.empty_like(src)

    def copy() -> None:
        dst[...] = src

    t_copy = _timer(cupy, copy, repeats)
    bandwidth = 2 * src.nbytes / t_copy  # bytes read + written per second
    code_bytes = n // 2 + state.n_blocks * 4
    t_deq = _timer(cupy, lambda: dequantize_4bit(packed, dev_state, impl="cuda"), repeats)
    t_gemv = _timer(cupy, lambda: gemv_4bit(packed, dev_state, x, impl="cuda"), repeats)
    deq_bw = (code_bytes + 4 * n) / t_deq  # codes + scales read, float32 written
    gemv_bw = (code_bytes + 4 * side * 2) / t_gemv  # codes + scales + x read, y written
    return [
        {"figure": "copy bandwidth", "value": f"{bandwidth / 1e9:.0f} GB/s",
         "detail": f"device-to-device copy of {src.nbytes / 2**20:.0f} MiB"},
        {"figure": "dequantize", "value": deq_bw / bandwidth, "goal": GOALS["dequantize"],
         "detail": f"NF4 {side}×{side}, blocksize 64, {1e6 * t_deq:.0f} µs, fraction of copy"},
        {"figure": "gemv", "value": gemv_bw / bandwidth, "goal": GOALS["gemv"],
         "detail": f"fused 4-bit GEMV {side}×{side}, {1e6 * t_gemv:.0f} µs, fraction of copy"},
    ]  # fmt: skip


def _sgmv_row(cupy: Any, smoke: bool, repeats: int) -> list[dict[str, Any]]:
    from ..kernels.cuda.sgmv import sgmv_lora_delta_cuda

    n_rows, d, r, n_adapters = (16, 64, 4, 8) if smoke else (512, 4096, 16, 8)
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((n_rows, d)).astype(np.float32))
    A = cupy.asarray(rng.standard_normal((n_adapters, r, d)).astype(np.float32))
    B = cupy.asarray(rng.standard_normal((n_adapters, d, r)).astype(np.float32))
    scaling = cupy.full(n_adapters, 2.0, dtype=cupy.float32)
    ranks = cupy.full(n_adapters, r, dtype=cupy.int64)
    mixed = cupy.asarray((np.arange(n_rows) % (n_adapters + 1)) - 1, dtype=cupy.int64)
    a0, b0 = A[0], B[0]

    def shared() -> Any:
        return (x @ a0.T) @ b0.T * 2.0  # one adapter for every row: two cuBLAS products

    t_mixed = _timer(cupy, lambda: sgmv_lora_delta_cuda(x, A, B, scaling, ranks, mixed), repeats)
    t_shared = _timer(cupy, shared, repeats)
    return [{"figure": "sgmv", "value": t_mixed / t_shared, "goal": GOALS["sgmv"],
             "detail": f"{n_adapters} adapters + none, {n_rows} rows, d={d}, r={r}: "
                       f"{1e6 * t_mixed:.0f} µs vs {1e6 * t_shared:.0f} µs (shared)"}]  # fmt: skip


def _gpt2_row(cupy: Any, smoke: bool, repeats: int) -> list[dict[str, Any]]:
    import minipeft

    from ..models import GPT2, GPT2Config
    from ..optim import AdamW
    from ..peft import LoraConfig, PeftModel, get_peft_model

    cfg = dict(vocab_size=512, n_positions=128, n_embd=256, n_layer=4, n_head=4,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    batch, seq = (8, 128)
    if smoke:
        cfg.update(n_embd=32, n_layer=2, n_positions=16)
        batch, seq = 2, 16
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(batch, seq))
    with tempfile.TemporaryDirectory() as tmp:
        minipeft.seed(0)
        base = GPT2(GPT2Config(**cfg))
        base.save_pretrained(Path(tmp) / "base")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                          init_lora_weights=False)  # fmt: skip
        get_peft_model(base, lora).save_pretrained(Path(tmp) / "adapter")
        model = PeftModel.from_pretrained(GPT2.from_pretrained(Path(tmp) / "base"),
                                          Path(tmp) / "adapter")  # fmt: skip
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        lm = model.get_base_model()
        dev_ids = cupy.asarray(ids)  # moved once, as a data loader on the device would

        def ours() -> None:
            opt.zero_grad()
            lm.loss(dev_ids).backward()
            opt.step()

        t_ours = _timer(cupy, ours, repeats)
        row: dict[str, Any] = {"figure": "gpt2_lora_step", "goal": GOALS["gpt2_lora_step"]}
        detail = f"LoRA r=8 on c_attn, L={cfg['n_layer']} d={cfg['n_embd']}, {batch}×{seq}"
        try:
            t_torch = _torch_step_seconds(Path(tmp), ids, repeats)
        except Exception as exc:
            row.update(value=None, detail=f"{detail}; minipeft {1e3 * t_ours:.1f} ms; "
                       f"PyTorch side unavailable: {type(exc).__name__}: {exc}")  # fmt: skip
            return [row]
    row.update(value=t_ours / t_torch,
               detail=f"{detail}: {1e3 * t_ours:.1f} ms vs {1e3 * t_torch:.1f} ms "
                      "(PyTorch CUDA eager + HF PEFT, AdamW)")  # fmt: skip
    return [row]


def _torch_step_seconds(directory: Path, ids: np.ndarray, repeats: int) -> float:
    import peft
    import torch
    import transformers

    if not torch.cuda.is_available():
        raise RuntimeError("torch was built without CUDA (or sees no device)")
    base = transformers.GPT2LMHeadModel.from_pretrained(directory / "base").cuda()
    model = peft.PeftModel.from_pretrained(base, directory / "adapter", is_trainable=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tids = torch.from_numpy(ids).cuda()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=tids, labels=tids).loss.backward()
        opt.step()

    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------- the report
def _render(report: dict[str, Any]) -> str:
    lines = [f"# gpu-check on {report['device']}", ""]
    if report["standin"]:
        lines += ["**Stand-in run (CPU): the figures below are meaningless.**", ""]
    lines += [f"Platform: Python {report['platform']}", ""]
    tests = report["tests"]
    if "tail" in tests:
        counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "skipped") if k in tests)
        lines += [f"Tests on CuPy: {counts} in {tests['seconds']} s (`{tests['command']}`)", ""]
    else:
        lines += [f"Tests on CuPy: {tests}", ""]
    lines += ["| figure | value | goal | met | detail |", "|---|---:|---:|---|---|"]
    for row in report["figures"]:
        if "error" in row:
            lines.append(f"| {row['figure']} | — | — | — | {row['error']} |")
            continue
        value, goal = row.get("value"), row.get("goal")
        met = ""
        if isinstance(value, float) and goal is not None:
            lower_is_better = row["figure"] in ("sgmv", "gpt2_lora_step")
            met = "yes" if (value <= goal if lower_is_better else value >= goal) else "no"
        shown = f"{value:.2f}" if isinstance(value, float) else (value or "—")
        lines.append(f"| {row['figure']} | {shown} | {goal or ''} | {met} | {row['detail']} |")
    return "\n".join(lines) + "\n"


def _write(directory: Path, report: dict[str, Any], text: str) -> None:
    from ..io import atomic_write_text
    from ..models.io import write_json_atomic

    write_json_atomic(directory / "gpu-check.json", json.loads(json.dumps(report, default=str)))
    atomic_write_text(directory / "gpu-check.md", text)
