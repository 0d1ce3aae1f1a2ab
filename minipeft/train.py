"""A small fine-tuning harness shared by the notebooks: classify sentences with MiniLM.

    model = SentenceClassifier(encoder, hidden_size=384)     # mean pooling + linear head
    task = tokenize_task(tokenizer, sentiment_lexicon_task()) # token ids cached per split
    result = train(model, task, steps=300, batch_size=32, lr=1e-3, seed=0)
    evaluate(model, task, "test")

Method-agnostic: the caller prepares the encoder (LoRA through ``get_peft_model``, BitFit,
adapters, prompts, full fine-tuning, …) and ``train`` updates exactly the parameters that
have ``requires_grad`` (the head always does).

What ``train`` records (``TrainResult``):
* ``losses`` — training loss of every step; ``curve`` — (step, mean training loss since
  the last evaluation, validation accuracy) every ``eval_every`` steps and at the end;
* ``step_seconds`` — wall time of each step (forward, backward, optimizer update);
  ``median_step_s`` their median;
* ``peak_bytes`` — the peak of memory allocated ABOVE what was already allocated, during
  ``memory_steps`` training steps traced by ``tracemalloc`` (NumPy reports its array
  buffers to tracemalloc): activations, gradients, optimizer state created then. It is
  not the process's resident size (weights loaded before training are not counted), and
  traced steps are excluded from the timing, since tracing slows Python down.

Reproducible: batches come from per-epoch permutations drawn from ``(seed, epoch)``, and
minipeft's generator (dropout) is reseeded from ``(seed, step)`` before every step, so a
run stopped at step k and resumed from its checkpoint (``save_checkpoint`` /
``load_checkpoint``: trainable tensors as safetensors, optimizer state through
``minipeft.optim.save_state``, progress as JSON — nothing pickled) continues exactly as
the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import backend
from .autograd import ops
from .autograd.tensor import Tensor, no_grad
from .io import atomic_directory, atomic_write, atomic_write_text
from .nn.layers import Linear
from .nn.module import Module
from .optim import AdamW
from .optim.io import load_state, save_state

__all__ = [
    "SentenceClassifier",
    "TokenizedSplit",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "load_minilm",
    "save_checkpoint",
    "tokenize_task",
    "train",
    "trainable_parameters",
]


# ---------------------------------------------------------------------------- model
class SentenceClassifier(Module):
    """logits = W·mean_pool(encoder(ids)) + b: MiniLM-style encoder, mean over real tokens.

    ``encoder(input_ids, attention_mask, token_type_ids)`` must return hidden states
    (B, T, C) of the real tokens (a ``BertModel``, a ``PeftModel`` around one, or a
    ``PromptedModel`` — which cuts off its virtual tokens, so they are not pooled).
    """

    def __init__(self, encoder: Module, hidden_size: int, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = Linear(hidden_size, num_labels)

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Tensor:
        from .models.bert import mean_pool

        h = self.encoder(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.head(mean_pool(h, attention_mask))  # (B, num_labels)


def load_minilm(
    directory: str | Path | None = None, *, keep_pooler: bool = False
) -> tuple[Module, Any]:
    """(BertModel, BertTokenizer) of all-MiniLM-L6-v2 (the installed package by default).

    The [CLS] pooler is dropped unless ``keep_pooler``: ``SentenceClassifier`` mean-pools
    the tokens, so the pooler's 147,840 numbers would only inflate BitFit's and full
    fine-tuning's trainable counts without ever receiving a gradient.
    """
    from .models.bert import BertModel, BertTokenizer, default_model_dir

    d = Path(directory) if directory is not None else default_model_dir()
    model = BertModel.from_pretrained(d)
    if not keep_pooler:
        model.pooler = None
    return model, BertTokenizer.from_pretrained(d, config=model.config)


def trainable_parameters(model: Module) -> list[tuple[str, Any]]:
    """(name, parameter) pairs with requires_grad, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """Token ids of one split, padded to its longest text; labels (n,)."""

    input_ids: np.ndarray  # (n, T) int64
    attention_mask: np.ndarray  # (n, T) int64
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``idx``, trimmed to the batch's longest text."""
        mask = self.attention_mask[idx]
        t = max(int(mask.sum(axis=1).max()), 1)
        return self.input_ids[idx, :t], mask[:, :t], self.labels[idx]


_CACHE: dict[tuple[int, str], TokenizedSplit] = {}


def tokenize_task(tokenizer: Any, splits: Mapping[str, Any]) -> dict[str, TokenizedSplit]:
    """Tokenize every split once; later calls with the same texts reuse the cached ids.

    ``splits`` maps names to objects with ``texts`` and ``labels`` (``LexiconTask``).
    """
    out = {}
    for name, split in splits.items():
        texts = list(split.texts)
        key = (id(tokenizer), hashlib.sha256("\x00".join(texts).encode()).hexdigest())
        if key not in _CACHE:
            enc = tokenizer.encode(texts)
            labels = np.asarray(split.labels, dtype=np.int64)
            _CACHE[key] = TokenizedSplit(enc["input_ids"], enc["attention_mask"], labels)
        out[name] = _CACHE[key]
    return out


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step ``step``: consecutive slices of per-epoch permutations drawn from (seed, e)."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        idx.extend(perm[offset : offset + batch_size - len(idx)].tolist())
    return np.asarray(idx, dtype=np.int64)


# ---------------------------------------------------------------------------- evaluation
def evaluate(
    model: Module,
    task: Mapping[str, TokenizedSplit],
    split: str = "validation",
    batch_size: int = 256,
    threads: int | None = 1,
) -> float:
    """Accuracy of ``model`` on ``split`` (eval mode, no gradients; mode restored after)."""
    with _blas_threads(threads):
        return _evaluate(model, task[split], batch_size)


def _evaluate(model: Module, data: TokenizedSplit, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with no_grad():
        for s in range(0, len(data), batch_size):
            ids, mask, labels = data.batch(np.arange(s, min(s + batch_size, len(data))))
            logits = backend.to_numpy(model(ids, mask).data)
            correct += int((logits.argmax(axis=1) == labels).sum())
    model.train(was_training)
    return correct / len(data)


# ---------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    """Everything ``train`` measured; ``to_json`` gives a JSON-ready dict."""

    steps: int
    trainable_params: int
    losses: list[float] = dataclasses.field(default_factory=list)
    curve: list[dict[str, float]] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0

    @property
    def median_step_s(self) -> float:
        return float(np.median(self.step_seconds)) if self.step_seconds else float("nan")

    @property
    def final_accuracy(self) -> float:
        return self.curve[-1]["val_acc"] if self.curve else float("nan")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name}: expected an integer ≥ {low}, got {value!r}")
    return int(value)


def train(
    model: Module,
    task: Mapping[str, TokenizedSplit],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    eval_every: int = 50,
    eval_split: str = "validation",
    memory_steps: int = 2,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[int, TrainResult], None] | None = None,
    extra_loss: Callable[[], Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> TrainResult:
    """Train the parameters of ``model`` that require gradients with AdamW on cross-entropy.

    param_groups: optimizer groups (``{"params": [...], "lr": ...}``, e.g. LoRA+); default
        one group of every trainable parameter with ``lr`` and ``weight_decay``.
    checkpoint: a directory; the state is saved there at every evaluation and at the end.
        With ``resume=True`` and a checkpoint present, training continues from it.
    callback: called as ``callback(step, result)`` after every evaluation.
    extra_loss: a term added to the loss of every step (AdaLoRA's
        ``model.orthogonal_regularization``); the recorded loss is the task loss alone.
    after_step: called as ``after_step(step)`` after the optimizer step, before the gradients
        are cleared (AdaLoRA's ``model.update_and_allocate``, in HF PEFT's order). Its state
        is the caller's: a resumed run does not restore it.
    threads: BLAS threads during training (default 1: on a shared machine a multi-threaded
        BLAS that waits for busy cores made steps ~15× slower here); None leaves BLAS alone.
    The model is left in eval mode.
    """
    with _blas_threads(threads):
        return _train(
            model, task, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            param_groups=param_groups, seed=seed, eval_every=eval_every, eval_split=eval_split,
            memory_steps=memory_steps, checkpoint=checkpoint, resume=resume, callback=callback,
            extra_loss=extra_loss, after_step=after_step, progress=progress,
        )  # fmt: skip


def _blas_threads(threads: int | None) -> Any:
    """A context limiting BLAS/OpenMP threads (threadpoolctl), or a no-op."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    _check_int("threads", threads, 1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/scipy
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


class _NoBar:
    """The steps without a progress bar (``progress=False``): tqdm is not needed then."""

    def __init__(self, steps: range) -> None:
        self.steps = steps

    def __iter__(self) -> Any:
        return iter(self.steps)

    def set_postfix(self, **_: Any) -> None:
        pass


def _progress_bar(steps: range, progress: bool) -> Any:
    """A tqdm bar over ``steps`` when ``progress``; tqdm is an optional dependency (the
    ``notebooks`` and ``dev`` extras), imported only here."""
    if not progress:
        return _NoBar(steps)
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "progress: True shows a tqdm progress bar, but tqdm is not installed; install "
            "it with pip install 'minipeft[notebooks]' (or pip install tqdm), or pass "
            "progress=False"
        ) from exc
    return tqdm(steps, desc="train", leave=False)


def _train(
    model: Module,
    task: Mapping[str, TokenizedSplit],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    param_groups: Sequence[Mapping[str, Any]] | None,
    seed: int,
    eval_every: int,
    eval_split: str,
    memory_steps: int,
    checkpoint: str | Path | None,
    resume: bool,
    callback: Callable[[int, TrainResult], None] | None,
    extra_loss: Callable[[], Tensor] | None,
    after_step: Callable[[int], None] | None,
    progress: bool,
) -> TrainResult:
    steps = _check_int("steps", steps, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    eval_every = _check_int("eval_every", eval_every, 1)
    seed = _check_int("seed", seed, 0)
    memory_steps = _check_int("memory_steps", memory_steps, 0)
    if "train" not in task or eval_split not in task:
        raise ValueError(f"task: expected splits 'train' and {eval_split!r}, got {sorted(task)}")
    named = trainable_parameters(model)
    if not named:
        raise ValueError("model: has no parameter with requires_grad; nothing to train")
    if param_groups is None:
        groups: list[dict[str, Any]] = [
            {"params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay}
        ]
    else:
        groups = [dict(g) for g in param_groups]
    opt = AdamW(groups, lr=lr, weight_decay=weight_decay)
    result = TrainResult(steps=steps, trainable_params=sum(p.size for _, p in named))
    start = 0
    if resume and checkpoint is not None and (Path(checkpoint) / "trainer.json").is_file():
        start = load_checkpoint(checkpoint, model, opt, result)
    data = task["train"]
    window: list[float] = []
    bar = _progress_bar(range(start, steps), progress)
    traced = 0
    for step in bar:
        model.train()
        trace = traced < memory_steps and step > start  # the first step warms caches
        if trace:
            tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        backend.seed(seed * 1_000_003 + step)  # dropout masks fixed by (seed, step)
        ids, mask, labels = data.batch(_batch_indices(len(data), batch_size, seed, step))
        loss = ops.cross_entropy(model(ids, mask), labels)
        total = loss if extra_loss is None else loss + extra_loss()
        opt.zero_grad()
        total.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        dt = time.perf_counter() - t0
        if trace:
            result.peak_bytes = max(result.peak_bytes, tracemalloc.get_traced_memory()[1] - base)
            tracemalloc.stop()
            traced += 1
        else:
            result.step_seconds.append(dt)
        value = float(loss.data)
        result.losses.append(value)
        window.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = _evaluate(model, task[eval_split], 256)
            result.curve.append({"step": step + 1, "loss": float(np.mean(window)), "val_acc": acc})
            window = []
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, opt, result, step + 1)
            if callback is not None:
                callback(step + 1, result)
    model.eval()
    return result


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    directory: str | Path, model: Module, optimizer: AdamW, result: TrainResult, step: int
) -> Path:
    """Write trainable tensors, optimizer state and progress (step, curves) to ``directory``.

    The directory is replaced as a whole (``minipeft.io.atomic_directory``): a crash leaves
    the previous checkpoint or this one, never weights of one step with the optimizer
    state or step count of another.
    """
    from safetensors.numpy import save_file

    d = Path(directory)
    tensors = {
        n: np.ascontiguousarray(backend.to_numpy(p.data)) for n, p in trainable_parameters(model)
    }
    progress = json.dumps({"step": step, "result": result.to_json()}, indent=1)
    meta = {"format": "minipeft-trainable/1"}
    with atomic_directory(d) as tmp:
        atomic_write(tmp / "trainable.safetensors", lambda f: save_file(tensors, f, metadata=meta))
        save_state(tmp / "optimizer.safetensors", optimizer)
        atomic_write_text(tmp / "trainer.json", progress)
    return d


def load_checkpoint(
    directory: str | Path, model: Module, optimizer: AdamW, result: TrainResult | None = None
) -> int:
    """Restore what ``save_checkpoint`` wrote; return the step to continue from.

    All three files are validated before anything is restored — tensor names, shapes,
    dtypes and finiteness, the progress record's types, the optimizer state (``load_state``
    validates before it restores) — so a bad checkpoint raises ValueError/TypeError naming
    the file and leaves ``model``, ``optimizer`` and ``result`` unchanged.
    """
    from .models.io import CheckpointError, load_safetensors, read_json

    d = Path(directory)
    wpath, tpath = d / "trainable.safetensors", d / "trainer.json"
    named = dict(trainable_parameters(model))
    tensors = load_safetensors(wpath, expected={n: tuple(p.shape) for n, p in named.items()})
    for name, arr in tensors.items():
        if arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise CheckpointError(
                f"{wpath}: tensor {name!r}: expected finite floating values, got dtype {arr.dtype}"
            )
    state = read_json(tpath)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{tpath}: step: expected an integer >= 0, got {step!r}")
    saved = _checked_progress(tpath, state.get("result")) if result is not None else None
    load_state(d / "optimizer.safetensors", optimizer)  # validated whole, then restored
    # everything is checked: nothing below can fail half-way
    for name, arr in tensors.items():
        p = named[name]
        p.data[...] = backend.xp_of(p.data).asarray(arr, dtype=p.dtype)
    if result is not None and saved is not None:
        result.losses[:] = saved["losses"]
        result.curve[:] = saved["curve"]
        result.step_seconds[:] = saved["step_seconds"]
        result.peak_bytes = saved["peak_bytes"]
    return step


def _checked_progress(path: Path, saved: Any) -> dict[str, Any]:
    """The saved ``TrainResult`` fields, type-checked (numbers may be NaN: a diverged run)."""
    from .models.io import CheckpointError

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    ok = (
        isinstance(saved, dict)
        and all(
            isinstance(saved.get(k), list) and all(number(v) for v in saved[k])
            for k in ("losses", "step_seconds")
        )
        and isinstance(saved.get("curve"), list)
        and all(isinstance(c, dict) and all(number(v) for v in c.values()) for c in saved["curve"])
        and isinstance(saved.get("peak_bytes"), int)
        and not isinstance(saved["peak_bytes"], bool)
        and saved["peak_bytes"] >= 0
    )
    if not ok:
        raise CheckpointError(
            f"{path}: result: expected losses and step_seconds (lists of numbers), curve "
            f"(a list of objects of numbers) and peak_bytes (an integer >= 0), "
            f"got {saved!r}"[:400]
        )
    return saved
