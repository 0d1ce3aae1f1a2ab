"""The first ``python -m minipeft verify`` on a fresh machine (issue 15): nothing compiles
at import, a kernel compiles only when a check calls it, and a compile says so on stderr
(once per kernel family, never on a warm cache). No timing is asserted here: the figures
are in the issue note; these tests pin the behaviour that gives them.

Each run uses its own empty ``NUMBA_CACHE_DIR``, so "cold" and "warm" are real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSG = "compiling Numba kernels for {} …"


def _run(args: list[str], cache_dir: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    full_env.update(NUMBA_CACHE_DIR=cache_dir, **env)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _jit_on() -> bool:
    return os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")


def test_importing_minipeft_and_collecting_checks_compiles_no_kernel(tmp_path) -> None:
    code = """
from numba.core import event
compiled = []
class L(event.Listener):
    def on_start(self, ev): compiled.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev): pass
event.register("numba:compile", L())
import minipeft
from minipeft.kernels.cpu import elementwise, gemv4, quant4, sgmv
from minipeft.verify import select
assert len(select()) > 100
print("COMPILED", compiled)
"""
    r = _run(["-c", code], str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "COMPILED []" in r.stdout
    assert not list(tmp_path.rglob("*.nbi")), "a kernel was compiled into the cache"


@pytest.mark.skipif(not _jit_on(), reason="NUMBA_DISABLE_JIT=1: nothing compiles")
def test_verify_says_once_per_family_what_compiles_and_nothing_when_warm(tmp_path) -> None:
    args = ["-m", "minipeft", "verify", "kernels.scatter_add_rows"]
    cold = _run(args, str(tmp_path))
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert cold.stderr.splitlines() == [MSG.format("elementwise")]
    assert list(tmp_path.rglob("*.nbi")), "the compiled kernel was not cached"
    warm = _run(args, str(tmp_path))
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert warm.stderr == ""  # loaded from the cache: no message
    # stdout's report is the same table either way (only the time in the last line moves)
    assert cold.stdout.splitlines()[:-1] == warm.stdout.splitlines()[:-1]
    assert "compiling" not in cold.stdout


def test_verify_without_jit_prints_no_compile_message(tmp_path) -> None:
    r = _run(
        ["-m", "minipeft", "verify", "kernels.scatter_add_rows"],
        str(tmp_path),
        NUMBA_DISABLE_JIT="1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    assert "1 passed, 0 failed" in r.stdout


def _kernel(module: str, name: str):
    """A tiny njit function that Numba sees as defined in ``module``."""
    from numba import njit

    def f(x):  # pragma: no cover - compiled
        return x + 1

    fn = types.FunctionType(f.__code__, {"__name__": module}, name)
    fn.__module__ = module
    return njit(cache=False)(fn)


@pytest.mark.skipif(not _jit_on(), reason="NUMBA_DISABLE_JIT=1: nothing compiles")
def test_compile_progress_names_each_family_once(capsys) -> None:
    from minipeft.kernels.cpu import compile_progress

    a = _kernel("minipeft.kernels.cpu.demo_family", "a")
    b = _kernel("minipeft.kernels.cpu.demo_family", "b")
    other = _kernel("somewhere_else", "c")
    with compile_progress() as compiled:
        a(1)
        b(1)  # same family: no second line
        a(2)  # already compiled for int64: no compile at all
        other(1.0)  # not a minipeft kernel: not reported
    err = capsys.readouterr().err
    assert err.splitlines() == [MSG.format("demo_family")]
    assert compiled == {"demo_family"}
    with compile_progress() as compiled:
        a(3)  # compiled already in this process
    assert compiled == set() and capsys.readouterr().err == ""
