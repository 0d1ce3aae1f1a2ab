"""``python -m minipeft COMMAND``: the command-line entry point.

Each module of ``minipeft.cli`` contributes one subcommand through ``register``.

The command line never shows a traceback. Exit status:

* 0 — success;
* 1 — the command ran and reports a negative result (``verify``: an equation failed);
* 2 — a usage or input error: ONE line on stderr, ``minipeft COMMAND: error: --ARG: …``,
  naming the argument (argparse's own errors included);
* 70 — an internal error (a bug in minipeft, EX_SOFTWARE from sysexits.h): one line,
  ``minipeft: internal error: TYPE: message (please report this …)``; set
  ``MINIPEFT_TRACEBACK=1`` to see the traceback instead;
* 130 — interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from .cli import EXPECTED_ERRORS, CLIError, one_line

EXIT_USAGE = 2
EXIT_INTERNAL = 70


class _Parser(argparse.ArgumentParser):
    """argparse, but an error raises CLIError (one line) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from . import cli

    parser = _Parser(
        prog="python -m minipeft",
        description="minipeft: parameter-efficient fine-tuning from first principles.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        importlib.import_module(f"{cli.__name__}.{mod.name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), None)
    prog = f"minipeft {command}" if command else "minipeft"
    try:
        parsed = build_parser().parse_args(args)
        return int(parsed.func(parsed) or 0)
    except CLIError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:  # an input error no subcommand tied to an argument
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if os.environ.get("MINIPEFT_TRACEBACK"):
            raise
        print(
            f"minipeft: internal error: {type(exc).__name__}: {one_line(exc)} (please report "
            "this with the command line; MINIPEFT_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
