"""Project hygiene that a reviewer checks first: no pickle, lint and format clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_FILES = [
    p for d in ("minipeft", "tests", "benchmarks", "notebooks") for p in (ROOT / d).rglob("*.py")
]


def test_no_pickle_anywhere():
    bad = []
    for path in PY_FILES:
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            bad.append(f"{path}: imports a pickle module")
        if re.search(r"allow_pickle\s*=\s*True", text):
            bad.append(f"{path}: allow_pickle=True")
        for m in re.finditer(r"np\.load\(([^)]*)\)", text):
            if "allow_pickle=False" not in m.group(1):
                bad.append(f"{path}: np.load without allow_pickle=False")
        if re.search(r"torch\.load\((?![^)]*weights_only=True)", text):
            bad.append(f"{path}: torch.load without weights_only=True")
    assert not bad, "\n".join(bad)


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff (dev extra) is not installed")
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("the ruff executable is not on PATH")
    return [exe]


def test_ruff_lint_clean():
    proc = subprocess.run([*_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_clean():
    proc = subprocess.run(
        [*_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
