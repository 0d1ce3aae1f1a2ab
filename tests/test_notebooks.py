"""Notebooks: every .ipynb is paired with its jupytext .py source and committed without outputs.

Executing them is part of the test command (``pytest`` runs with ``--nbmake``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="jupytext (dev extra) checks notebook pairs")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))


def test_there_are_notebooks():
    assert SOURCES, "no notebooks/*.py sources found"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync_and_stripped(src):
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{src.name} has no paired {ipynb.name}: run jupytext --sync"
    raw = json.loads(ipynb.read_text(encoding="utf-8"))
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{ipynb.name} is committed with outputs"
            assert cell.get("execution_count") is None, f"{ipynb.name} has execution counts"
    from_py = jupytext.read(src)
    from_nb = jupytext.read(ipynb)
    cells_py = [(c.cell_type, c.source.strip()) for c in from_py.cells]
    cells_nb = [(c.cell_type, c.source.strip()) for c in from_nb.cells]
    assert cells_py == cells_nb, f"{src.name} and {ipynb.name} differ: run jupytext --sync"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_names_its_lecture_section(src):
    head = src.read_text(encoding="utf-8")[:4000].lower()
    assert "lecture" in head, f"{src.name} should say which lecture section it follows"
