"""``python -m minipeft logits --model DIR --ids 1,2,3 --out FILE.npy``: next-token logits.

Loads a GPT-2 checkpoint directory (``config.json`` + ``model.safetensors``, as written by
transformers or minipeft), runs one forward pass in eval mode over the given token ids and
writes the float32 logits (T, vocab) with ``np.save`` (atomically: temporary file, then
rename). Compare with ``transformers`` via ``GPT2LMHeadModel(...)(ids).logits[0]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..autograd.tensor import no_grad
from ..models import io


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
        return np.array([int(s) for s in parts], dtype=np.int64)
    except ValueError:
        raise ValueError(
            f"--ids: expected comma-separated integers like 1,2,3, got {text!r}"
        ) from None


def compute_logits(
    model_dir: str | Path, ids: np.ndarray, adapter_dir: str | Path | None = None
) -> np.ndarray:
    """Float32 logits (T, vocab) of the GPT-2 checkpoint in ``model_dir`` for ``ids`` (T,).

    With ``adapter_dir`` the PEFT adapter stored there (LoRA, DoRA, VeRA, IA3) wraps the
    model first (``minipeft.peft.PeftModel.from_pretrained``).
    """
    from ..models.gpt2 import GPT2

    model = GPT2.from_pretrained(model_dir)
    if adapter_dir is not None:
        from ..peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with no_grad():
        logits = model(ids[None, :])  # (1, T, V)
    return np.asarray(logits.numpy()[0], dtype=np.float32)  # (T, V)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to a temporary file beside ``path``, then rename it into place."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save appends no ".npy"
            np.save(fh, array, allow_pickle=False)

    return io.atomic_write(Path(path), write)


def main(args: argparse.Namespace) -> int:
    try:
        ids = parse_ids(args.ids)
        logits = compute_logits(args.model, ids, getattr(args, "adapter", None))
        out = save_npy_atomic(args.out, logits)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"minipeft logits: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote logits {logits.shape} float32 to {out}")
    return 0
