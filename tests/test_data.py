"""The real data sets: fixed splits, nothing written by the project."""

from __future__ import annotations

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
