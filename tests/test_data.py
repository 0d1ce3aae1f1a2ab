"""The real data sets: fixed splits, nothing written by the project."""

from __future__ import annotations

import numpy as np
import pytest

from minipeft.data import general_sentences, sentiment_lexicon_task


def test_lexicon_splits_are_fixed_disjoint_and_labelled_by_the_raters():
    pytest.importorskip("vaderSentiment", reason="the lexicon ships with vaderSentiment")
    task = sentiment_lexicon_task()
    sizes = {k: len(v) for k, v in task.items()}
    assert sizes == {"train": 4844, "validation": 981, "test": 992}
    seen = set()
    for split in task.values():
        assert seen.isdisjoint(split.texts)
        seen.update(split.texts)
        assert ((split.ratings > 0) == (split.labels == 1)).all()
        assert (abs(split.ratings) >= 0.5).all()
    # entries the raters scored clearly: spot-check the source, not our code
    rating = {t: r for split in task.values() for t, r in zip(split.texts, split.ratings)}
    assert rating["dissatisfied"] == -1.6 and rating["masterpieces"] > 0
    assert sentiment_lexicon_task()["test"].texts == task["test"].texts  # deterministic


def test_general_sentences_are_prose():
    s = general_sentences(32)
    assert len(s) == 32 == len(set(s))
    assert all(x.endswith(".") and 8 <= len(x.split()) <= 30 for x in s)
    with pytest.raises(ValueError, match="n:"):
        general_sentences(0)


def test_char_corpora_are_real_text_in_the_character_vocabulary():
    from minipeft.data import CHAR_VOCAB, char_corpora, encode_chars

    a, b = char_corpora()
    assert a.size == 200_000 and b.size > 10_000
    assert a.min() >= 0 and max(a.max(), b.max()) < CHAR_VOCAB
    # the encoding, against its definition: '\n' → 0, ' ' → 1, '~' → 95, 'é' → '?'
    np.testing.assert_array_equal(encode_chars("\n ~é"), [0, 1, 95, ord("?") - 31])
    assert (char_corpora()[1] == b).all()  # deterministic
    with pytest.raises(ValueError, match="max_chars_a"):
        char_corpora(0)
