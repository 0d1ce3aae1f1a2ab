"""Real data that ships with well-kept software — nothing here was written for minipeft.

``sentiment_lexicon_task``: the VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014),
shipped by the PyPI package ``vaderSentiment``: 7,517 English words, slang terms and
emoticons, each rated on −4…+4 by ten human raters. The task is binary polarity: is the
mean rating positive? Entries whose mean lies within ±0.5 of neutral are left out (the
raters did not agree on a side), which leaves 6,817 entries (3,000 positive). The split is
fixed by a hash of the text (SHA-256), so it does not depend on NumPy's generator or on
the order of the file: 4,844 train, 981 validation and 992 test entries. The metric is
accuracy; always answering "negative" scores 58.4 % on the test split.

``char_corpora``: two real text corpora for a character-level language model — the
docstrings of NumPy's public callables (English prose with examples) and the source of five
pure-Python standard-library modules (code) — encoded to ``CHAR_VOCAB`` ids. Notebooks 02
and 05 pretrain a small GPT-2 on the first and adapt it to the second.

``general_sentences``: sentences from the Python documentation's topic pages
(``pydoc_data.topics``, part of CPython), used to measure how far fine-tuning moves a
model's embeddings of text unrelated to the task (forgetting).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CHAR_VOCAB",
    "LexiconTask",
    "char_corpora",
    "encode_chars",
    "general_sentences",
    "sentiment_lexicon_task",
]

_NEUTRAL_BAND = 0.5
CHAR_VOCAB = 96  # printable ASCII 32..126 → 1..95, newline → 0; anything else → "?"
_STDLIB_MODULES = ("textwrap", "heapq", "bisect", "fnmatch", "shlex")


@dataclass(frozen=True)
class LexiconTask:
    """Texts, binary labels (1 = positive) and mean ratings for one split."""

    texts: tuple[str, ...]
    labels: np.ndarray  # (n,) int64
    ratings: np.ndarray  # (n,) float64, mean of the ten human ratings

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int) -> LexiconTask:
        """The first ``n`` examples (the split's order is fixed by the hash)."""
        if n < 1:
            raise ValueError(f"n: expected a positive number of examples, got {n}")
        return LexiconTask(self.texts[:n], self.labels[:n], self.ratings[:n])


def _bucket(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (SHA-256 of its UTF-8 bytes)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sentiment_lexicon_task() -> dict[str, LexiconTask]:
    """{"train", "validation", "test"} splits of the VADER lexicon polarity task."""
    try:
        source = importlib.resources.files("vaderSentiment") / "vader_lexicon.txt"
        raw = source.read_text(encoding="utf-8")
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the sentiment task reads the VADER lexicon shipped by the 'vaderSentiment' "
            "package: pip install vaderSentiment (part of the 'notebooks' and 'dev' extras)"
        ) from exc
    rows: list[tuple[float, str, float]] = []
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"vader_lexicon.txt line {line_no}: expected tab-separated fields")
        text, mean = fields[0], float(fields[1])
        if abs(mean) < _NEUTRAL_BAND:
            continue
        rows.append((_bucket(text), text, mean))
    rows.sort()
    splits: dict[str, list[tuple[str, float]]] = {"train": [], "validation": [], "test": []}
    for b, text, mean in rows:
        key = "train" if b < 0.70 else ("validation" if b < 0.85 else "test")
        splits[key].append((text, mean))
    out = {}
    for key, items in splits.items():
        ratings = np.array([m for _, m in items], dtype=np.float64)
        out[key] = LexiconTask(tuple(t for t, _ in items), (ratings > 0).astype(np.int64), ratings)
    return out


def general_sentences(n: int = 64) -> list[str]:
    """``n`` sentences from CPython's documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    if n < 1:
        raise ValueError(f"n: expected a positive number of sentences, got {n}")
    found: list[str] = []
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            if 8 <= len(words) <= 30 and sentence[0].isupper() and sentence.endswith("."):
                if not any(c in sentence for c in "=*()[]{}<>`|\\"):
                    found.append(sentence)
    found = sorted(set(found), key=_bucket)
    if len(found) < n:
        raise ValueError(f"n: only {len(found)} sentences are available, asked for {n}")
    return found[:n]


def encode_chars(text: str) -> np.ndarray:
    """Character ids in [0, CHAR_VOCAB): printable ASCII 32..126 → 1..95, newline → 0, else '?'."""
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    ids = codes - 31
    ids[codes == 10] = 0
    ids[(ids < 0) | (ids >= CHAR_VOCAB)] = ord("?") - 31
    return ids


def char_corpora(max_chars_a: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """(NumPy's docstrings, standard-library source) as character ids, in a fixed order."""
    import importlib
    import inspect

    if max_chars_a < 1:
        raise ValueError(f"max_chars_a: expected a positive length, got {max_chars_a}")
    names = sorted(dir(np))
    docs = [getattr(np, n).__doc__ for n in names if callable(getattr(np, n, None))]
    corpus_a = encode_chars("\n".join(d for d in docs if d)[:max_chars_a])
    modules = [importlib.import_module(m) for m in _STDLIB_MODULES]
    corpus_b = encode_chars("\n".join(inspect.getsource(m) for m in modules))
    return corpus_a, corpus_b
