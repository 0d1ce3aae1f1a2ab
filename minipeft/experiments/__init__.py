"""Experiments that measure minipeft's methods on a real pretrained model and real data.

``compare``: fine-tuning methods on all-MiniLM-L6-v2 and the VADER lexicon task
(``python -m minipeft compare --full --out results/``, command ``minipeft.cli.compare``;
``python -m minipeft.experiments.compare`` is the older spelling). Imported lazily, so that
``python -m minipeft.experiments.compare`` runs the module once.
"""

import importlib
from typing import Any

__all__ = ["compare"]


def __getattr__(name: str) -> Any:
    if name == "compare":
        return importlib.import_module(f"{__name__}.compare")
    raise AttributeError(f"module 'minipeft.experiments' has no attribute {name!r}")
