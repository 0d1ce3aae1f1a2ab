"""``python -m minipeft compare [--full] --out DIR …``: the method comparison of issue 7.

Fine-tuning methods on all-MiniLM-L6-v2 and the VADER lexicon task
(``minipeft.experiments.compare``, which documents the protocol); writes
``real_model_comparison.json``/``.md`` and ``real_model_curves.png`` to ``--out`` and
prints the table. ``--render JSON`` only re-renders the .md/.png from a results file.
``python -m minipeft.experiments.compare …`` is the older spelling of the same command.

Arguments are checked, and ``--out`` probed, before anything runs; every failure is one
line naming the argument (see ``minipeft.__main__``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import check_directory_target
from . import argument

_COUNTS = ("steps", "sweep_steps", "eval_every", "subset", "eval_subset")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare fine-tuning methods on all-MiniLM-L6-v2 (VADER lexicon task)",
        description="Compare fine-tuning methods on all-MiniLM-L6-v2 (VADER lexicon task); "
        "the default is the reduced (CI) mode, --full the committed table.",
    )
    p.add_argument("--full", action="store_true", help="the full comparison (compare.FULL)")
    p.add_argument("--steps", type=int, help="training steps per method")
    p.add_argument("--sweep-steps", type=int, help="steps of each learning-rate trial")
    p.add_argument("--eval-every", type=int, help="validation accuracy every this many steps")
    p.add_argument("--subset", type=int, help="training examples (default: reduced 256)")
    p.add_argument("--eval-subset", type=int, help="validation/test examples")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="method names, from minipeft.experiments.compare.METHODS (default: FULL's)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the results files")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress lines")
    p.add_argument(
        "--render", metavar="JSON", help="only re-render .md/.png from a results JSON file"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..experiments.compare import (
        FULL,
        METHODS,
        REDUCED,
        format_table,
        run_comparison,
        write_results,
    )
    from ..nn.layers import check_positive_int
    from ..peft.config import check_int

    for key in _COUNTS:
        flag = "--" + key.replace("_", "-")
        if getattr(args, key) is not None:
            with argument(flag):
                check_positive_int(flag, getattr(args, key))
    with argument("--seed"):
        check_int("--seed", args.seed, 0)
    if args.methods is not None:
        with argument("--methods"):
            unknown = [m for m in args.methods if m not in METHODS]
            if unknown or len(set(args.methods)) != len(args.methods):
                raise ValueError(
                    f"expected distinct names from {sorted(METHODS)}, got {args.methods}"
                )
    with argument("--out"):  # before any computing
        check_directory_target(args.out, "--out")
    if args.render:
        with argument("--render"):
            results = json.loads(Path(args.render).read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError(f"{args.render}: expected a JSON object of results")
        with argument("--out"):
            files = write_results(results, args.out)
        for f in files:
            print(f)
        return 0
    cfg = dict(FULL if args.full else REDUCED)
    for key in ("methods", *_COUNTS):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    results = run_comparison(
        cfg["methods"], cfg["steps"], cfg["subset"], args.seed, sweep_steps=cfg["sweep_steps"],
        eval_every=cfg["eval_every"], eval_subset=cfg["eval_subset"],
        n_general=cfg["n_general"],
        progress=not args.no_progress,
    )  # fmt: skip
    with argument("--out"):
        files = write_results(results, args.out)
    for f in files:
        print(f)
    print(format_table(results))
    return 0
