"""Dependencies (issue 15): what minipeft imports is either declared in pyproject.toml's
``dependencies`` or imported only where it is needed, with an error naming the extra.

* tqdm (extras ``notebooks``/``dev``): ``train(..., progress=False)`` runs without it;
  ``progress=True`` without it is an ImportError naming ``minipeft[notebooks]``.
* threadpoolctl is a core dependency (``unified_table`` pins BLAS to one thread for its
  latency ratios; ``train(threads=...)``), so it is declared, not guarded.

A missing package is simulated in a subprocess with ``sys.modules[name] = None``, which
makes ``import name`` raise ImportError as if it were not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_TRAIN = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import name -> ImportError, as if not installed
sys.path.insert(0, {tests!r})
from test_train import tiny_classifier, tiny_task
from minipeft.train import train
try:
    r = train(tiny_classifier(), tiny_task(), steps=2, batch_size=4, lr=1e-2, eval_every=2,
              progress={progress})
    print("OK", len(r.losses))
except ImportError as exc:
    print("IMPORTERROR", exc)
assert all(sys.modules.get(n) is None for n in {blocked!r}), "a blocked module was imported"
"""


def _train_without(blocked: list[str], progress: bool) -> str:
    code = _TRAIN.format(blocked=blocked, tests=str(ROOT / "tests"), progress=progress)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_train_without_progress_needs_no_tqdm() -> None:
    out = _train_without(["tqdm", "tqdm.auto"], progress=False)
    assert "OK 2" in out


def test_train_with_progress_and_no_tqdm_names_the_extra() -> None:
    out = _train_without(["tqdm", "tqdm.auto"], progress=True)
    assert "IMPORTERROR" in out
    assert "minipeft[notebooks]" in out and "progress=False" in out


def test_train_with_progress_uses_tqdm_when_installed() -> None:
    pytest.importorskip("tqdm")
    assert "OK 2" in _train_without([], progress=True)


def test_threadpoolctl_is_a_declared_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    assert "threadpoolctl" in names
    assert "tqdm" not in names  # optional: only train(progress=True) and the notebooks use it
    # the one unguarded import it covers
    src = (ROOT / "minipeft" / "peft" / "unified.py").read_text(encoding="utf-8")
    assert "from threadpoolctl import threadpool_limits" in src
