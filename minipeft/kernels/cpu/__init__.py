"""minipeft.kernels.cpu: the Numba kernels, one module per family (elementwise, quant4,
gemv4, sgmv).

Every kernel is ``@njit(cache=True)`` without a signature, so nothing compiles at import:
a kernel compiles on its first call with new argument types, and the machine code is
cached beside its source (``minipeft/kernels/cpu/__pycache__/*.nbi|*.nbc``, or under
``NUMBA_CACHE_DIR`` when that is set). A compile that misses the cache takes seconds;
:func:`compile_progress` says so on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["compile_progress"]


@contextmanager
def compile_progress(stream: TextIO | None = None) -> Iterator[set[str]]:
    """Within the block, print ``compiling Numba kernels for FAMILY …`` once per kernel
    family (the module's name: ``gemv4``, ``quant4``, ...) when one of its kernels really
    compiles; a kernel loaded from the cache says nothing. Yields the set of families that
    compiled. ``stream``: default ``sys.stderr`` (looked up when a message is printed).
    Does nothing with ``NUMBA_DISABLE_JIT=1`` (no compile ever happens)."""
    from numba.core import event  # numba is already imported by whoever runs a kernel

    compiled: set[str] = set()
    prefix = __name__ + "."

    class _Progress(event.Listener):
        def on_start(self, ev: Any) -> None:  # a cache miss: Numba is about to compile
            fn = getattr(ev.data.get("dispatcher"), "py_func", None)
            module = getattr(fn, "__module__", None) or ""
            if not module.startswith(prefix):
                return
            family = module[len(prefix) :].split(".")[0]
            if family not in compiled:
                compiled.add(family)
                out = stream if stream is not None else sys.stderr
                print(f"compiling Numba kernels for {family} …", file=out, flush=True)

        def on_end(self, ev: Any) -> None:
            pass

    with event.install_listener("numba:compile", _Progress()):
        yield compiled
