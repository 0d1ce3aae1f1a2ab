"""The equation registry holds every equation three times: derived, implemented, checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minipeft.__main__ import main
from minipeft.verify import Outcome, collect, equation, run, select
from minipeft.verify import registry as registry_module

ROOT = Path(__file__).resolve().parents[1]
EQUATIONS = sorted(collect().values(), key=lambda e: e.id)


def test_registry_is_populated():
    assert len(EQUATIONS) >= 20, [e.id for e in EQUATIONS]


@pytest.mark.parametrize("eq", EQUATIONS, ids=lambda e: e.id)
def test_equation_is_derived_and_implemented(eq):
    md = ROOT / "derivations" / eq.derivation
    assert md.is_file(), f"{eq.id}: derivation file {md} is missing"
    anchor = f'<a id="{eq.id}"></a>'
    assert anchor in md.read_text(encoding="utf-8"), f"{eq.id}: no anchor {anchor} in {md.name}"
    doc = eq.implements.__doc__ or ""
    assert f"[{eq.id}]" in doc, f"{eq.id}: {eq.implementation_name}'s docstring lacks [{eq.id}]"
    assert eq.tol >= 0 and eq.what.strip()


@pytest.mark.parametrize("eq", EQUATIONS, ids=lambda e: e.id)
def test_equation_check_passes(eq):
    (result,) = run([eq])
    assert result.message == "", result.message
    assert result.passed, f"{eq.id}: error {result.error:.3e} > tol {eq.tol:.1e}"
    for name, arr in result.arrays.items():
        assert isinstance(arr, np.ndarray), f"{eq.id}: golden array {name!r} is not an ndarray"


@pytest.fixture
def failing_equation():
    """A deliberately wrong equation, registered for one test and removed afterwards."""

    def wrong_square(x):
        """Claims d(x²)/dx = x.   [selftest.wrong]"""
        return x

    @equation("selftest.wrong", what="a wrong derivative", derivation="autograd.md",
              implements=wrong_square, tol=1e-6)  # fmt: skip
    def _check():
        x = np.linspace(-1, 1, 5)
        fd = ((x + 1e-6) ** 2 - (x - 1e-6) ** 2) / 2e-6
        return Outcome(error=float(np.max(np.abs(wrong_square(x) - fd))))

    yield "selftest.wrong"
    del registry_module._REGISTRY["selftest.wrong"]


def test_a_wrong_equation_fails_the_report(failing_equation, capsys):
    assert main(["verify", failing_equation]) == 1
    out = capsys.readouterr().out
    assert re.search(r"selftest\.wrong .* FAIL", out), out
    assert "0 passed, 1 failed" in out


def test_a_raising_check_is_reported_not_crashing(capsys):
    @equation("selftest.raises", what="raises", derivation="autograd.md",
              implements=test_registry_is_populated, tol=1.0)  # fmt: skip
    def _check():
        raise ValueError("boom")

    try:
        (result,) = run(select("selftest.raises"))
        assert not result.passed and "ValueError: boom" in result.message
    finally:
        del registry_module._REGISTRY["selftest.raises"]


def test_duplicate_and_malformed_ids_are_rejected():
    first = EQUATIONS[0]
    with pytest.raises(ValueError, match="registered twice"):
        equation(first.id, what="x", derivation="a.md", implements=len, tol=0)(lambda: None)
    with pytest.raises(ValueError, match="id"):
        equation("nodot", what="x", derivation="a.md", implements=len, tol=0)
    with pytest.raises(ValueError, match="derivation"):
        equation("a.b", what="x", derivation="derivations/a.md", implements=len, tol=0)
    with pytest.raises(ValueError, match="tol"):
        equation("a.b", what="x", derivation="a.md", implements=len, tol=-1)


def test_verify_pattern_and_unknown_pattern(capsys):
    assert main(["verify", "ops.add"]) == 0
    out = capsys.readouterr().out
    assert "ops.add" in out and "1 passed, 0 failed" in out
    assert main(["verify", "no.such.equation"]) == 2


def test_export_writes_golden_vectors(tmp_path):
    assert main(["verify", "ops.*", "--export", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "minipeft-golden/1"
    entries = {e["id"]: e for e in index["equations"]}
    assert "ops.matmul" in entries
    for e in entries.values():
        arrays = load_file(tmp_path / e["file"])
        assert set(arrays) == set(e["arrays"]), e["id"]
        for name, meta in e["arrays"].items():
            assert list(arrays[name].shape) == meta["shape"]
        assert e["measured_error"] <= e["tolerance"]
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"
