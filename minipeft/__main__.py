"""``python -m minipeft COMMAND``: the command-line entry point.

Each module of ``minipeft.cli`` contributes one subcommand through ``register``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import cli

    parser = argparse.ArgumentParser(
        prog="python -m minipeft",
        description="minipeft: parameter-efficient fine-tuning from first principles.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        importlib.import_module(f"{cli.__name__}.{mod.name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
