"""``python -m minipeft logits --model DIR --ids 1,2,3 --out FILE.npy``: next-token logits.

Loads a GPT-2 checkpoint directory (``config.json`` + ``model.safetensors``, as written by
transformers or minipeft), runs one forward pass in eval mode over the given token ids and
writes the float32 logits (T, vocab) with ``np.save`` (atomically: temporary file, then
rename). Compare with ``transformers`` via ``GPT2LMHeadModel(...)(ids).logits[0]``.

``--ids`` and ``--out`` are checked before the model is loaded; every failure is one line
naming the argument (see ``minipeft.__main__``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..autograd.tensor import no_grad
from ..io import check_file_target, save_npy_atomic
from . import argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logits",
        help="write a GPT-2 checkpoint's logits for a sequence of token ids to a .npy file",
        description="Run a GPT-2 checkpoint (config.json + model.safetensors) on token ids and "
        "save the float32 logits, shape (T, vocab), with np.save.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="optional PEFT adapter directory (adapter_config.json + adapter_model.safetensors, "
        "as written by HF PEFT or minipeft) applied on top of the model",
    )
    p.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 464,3290,318")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy file")
    p.set_defaults(func=main)


def parse_ids(text: str) -> np.ndarray:
    """``"1,2,3"`` → int64 array [1, 2, 3]; a clear ValueError for anything else."""
    parts = [s.strip() for s in text.split(",")]
    if not parts or any(not s for s in parts):
        raise ValueError(f"--ids: expected comma-separated integers like 1,2,3, got {text!r}")
    try:
        values = [int(s) for s in parts]
    except ValueError:
        raise ValueError(
            f"--ids: expected comma-separated integers like 1,2,3, got {text!r}"
        ) from None
    big = [v for v in values if not -(2**63) <= v < 2**63]
    if big:
        raise ValueError(f"--ids: expected token ids that fit in int64, got {big[0]}")
    return np.array(values, dtype=np.int64)


def compute_logits(
    model_dir: str | Path, ids: np.ndarray, adapter_dir: str | Path | None = None
) -> np.ndarray:
    """Float32 logits (T, vocab) of the GPT-2 checkpoint in ``model_dir`` for ``ids`` (T,).

    With ``adapter_dir`` the PEFT adapter stored there (LoRA, DoRA, VeRA, IA3) wraps the
    model first (``minipeft.peft.PeftModel.from_pretrained``).
    """
    return run_logits(load_model(model_dir, adapter_dir), ids)


def load_model(model_dir: str | Path, adapter_dir: str | Path | None = None) -> Any:
    """The GPT-2 checkpoint in ``model_dir``, wrapped by the adapter in ``adapter_dir``."""
    from ..models.gpt2 import GPT2

    model = GPT2.from_pretrained(model_dir)
    if adapter_dir is not None:
        from ..peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def run_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """Float32 logits (T, vocab) of ``model`` (eval mode) for ``ids`` (T,)."""
    with no_grad():
        logits = model(ids[None, :])  # (1, T, V)
    return np.asarray(logits.numpy()[0], dtype=np.float32)  # (T, V)


def main(args: argparse.Namespace) -> int:
    with argument("--ids"):
        ids = parse_ids(args.ids)
    with argument("--out"):  # before any computing
        check_file_target(args.out, "--out")
    with argument("--model"):
        model = load_model(args.model)
    if getattr(args, "adapter", None) is not None:
        from ..peft import PeftModel

        with argument("--adapter"):
            model = PeftModel.from_pretrained(model, str(args.adapter)).eval()
    with argument("--ids"):
        logits = run_logits(model, ids)
    with argument("--out"):
        out = save_npy_atomic(args.out, logits)
    print(f"wrote logits {logits.shape} float32 to {out}")
    return 0
