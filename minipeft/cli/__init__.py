"""Subcommands of ``python -m minipeft``: each module here defines ``register(subparsers)``.

Errors: a subcommand runs each step under ``argument(NAME)``; an expected failure there
(bad input, a file that cannot be read or written, an id that overflows) becomes a
``CLIError`` whose message starts with the argument's name, and ``minipeft.__main__``
prints it as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

__all__ = ["EXPECTED_ERRORS", "CLIError", "argument", "one_line"]


class CLIError(Exception):
    """A failure the user can fix; the message names the argument."""


#: failures that come from the input (files, values), not from a bug in minipeft
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes CheckpointError, OutputPathError, UnicodeError
    TypeError,
    KeyError,
    OSError,
    OverflowError,
    MemoryError,
    RecursionError,
    ImportError,
    re.error,
)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (KeyError's quotes dropped)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__


@contextlib.contextmanager
def argument(name: str) -> Iterator[None]:
    """Turn an expected failure inside the block into a CLIError naming ``name``."""
    try:
        yield
    except CLIError:
        raise
    except EXPECTED_ERRORS as exc:
        text = one_line(exc)
        if isinstance(exc, OSError) and exc.strerror and exc.filename and text.startswith("["):
            text = f"{exc.filename}: {exc.strerror}"
        if not text.startswith(f"{name}:"):
            text = f"{name}: {text}"
        raise CLIError(text) from exc
