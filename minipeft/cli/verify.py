"""``python -m minipeft verify [PATTERN] [--export DIR]``: run the equation checks."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from ..io import atomic_directory, check_directory_target
from ..kernels.cpu import compile_progress
from ..verify import Result, run, select
from . import CLIError, argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="run every registered equation check and print the report",
        description="Run the registered equation checks (float64 finite differences and "
        "exact references) and print one row per equation.",
    )
    p.add_argument("pattern", nargs="?", help="only ids matching this glob or prefix")
    p.add_argument("--export", metavar="DIR", help="write golden vectors (safetensors + JSON)")
    p.add_argument("--list", action="store_true", help="list the equations without running")
    p.set_defaults(func=main)


def _fmt_err(r: Result) -> str:
    return "error" if not np.isfinite(r.error) else f"{r.error:.2e}"


def report(results: list[Result]) -> str:
    """The verification table: id, what, max error, tolerance, status, derivation."""
    rows = [("id", "what", "max err", "tol", "", "derivation")]
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        what = r.equation.what if len(r.equation.what) <= 58 else r.equation.what[:57] + "…"
        rows.append(
            (r.equation.id, what, _fmt_err(r), f"{r.equation.tol:.0e}", status, r.equation.link)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.message:
            lines.append(f"  {r.equation.id}: {r.message}")
        elif r.note and not r.passed:
            lines.append(f"  {r.equation.id}: {r.note}")
    n_pass = sum(r.passed for r in results)
    total = sum(r.seconds for r in results)
    lines.append(f"{n_pass} passed, {len(results) - n_pass} failed in {total:.1f} s")
    return "\n".join(lines)


def export(results: list[Result], out_dir: str | os.PathLike[str]) -> Path:
    """Write one safetensors file per equation and ``index.json`` describing them.

    The directory is written atomically (``minipeft.io.atomic_directory``): the index and
    the files it names are replaced together.
    """
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        _export_into(results, tmp)
    return out


def _export_into(results: list[Result], out: Path) -> None:
    from safetensors.numpy import save_file

    index = []
    for r in results:
        if not r.arrays:
            continue
        fname = f"{r.equation.id}.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in r.arrays.items()}
        save_file(arrays, str(out / fname), metadata={"equation": r.equation.id})
        index.append(
            {
                "id": r.equation.id,
                "what": r.equation.what,
                "derivation": r.equation.link,
                "implementation": r.equation.implementation_name,
                "tolerance": r.equation.tol,
                "measured_error": r.error,
                "file": fname,
                "arrays": {
                    k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()
                },
            }
        )
    with open(out / "index.json", "w", encoding="utf-8") as fh:
        json.dump({"format": "minipeft-golden/1", "equations": index}, fh, indent=1)


def main(args: argparse.Namespace) -> int:
    if args.export is not None:
        with argument("--export"):  # before any computing
            check_directory_target(args.export, "--export")
    with argument("PATTERN"):
        eqs = select(args.pattern)
    if not eqs:
        raise CLIError(f"PATTERN: no registered equation matches {args.pattern!r}")
    if args.list:
        for e in eqs:
            print(f"{e.id:32s} {e.what}  [{e.link}]")
        return 0
    with compile_progress():  # stderr: which kernel families compile (a cold cache only)
        results = run(eqs)
    print(report(results))
    if args.export is not None:
        with argument("--export"):
            path = export(results, args.export)
        print(f"golden vectors written to {path}/ (index.json)")
    return 0 if all(r.passed for r in results) else 1
