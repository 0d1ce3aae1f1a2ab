"""DreamBooth with prior preservation (Ruiz et al., 2023), fine-tuned with LoRA (lecture §3.3).

A base class-conditional diffusion model ε_θ₀ (``minipeft.diffusion``) learns a "subject"
from K ≈ 3–5 images bound to a new identifier token [V], while the class token keeps what
it generated before:

    L(φ) = L_inst(φ) + λ·L_prior(φ)                                      [dreambooth.prior_loss]
    L_inst  = E_{x∈D_inst, ε, t} ‖ε − ε_θ(xₜ, t, [V])‖²
    L_prior = E_{x∈D_prior, ε, t} ‖ε − ε_θ(xₜ, t, c_class)‖²,  D_prior ~ p_θ₀(· | c_class)

θ = θ₀ + LoRA(φ): only the adapters φ = {A, B} of the denoiser's Linear layers train, so

    ∇_φ L = ∇_φ L_inst + λ·∇_φ L_prior                                   [dreambooth.loss_grad]

and with the adapters disabled the model is θ₀ bit for bit. D_prior is drawn from the frozen
base model before fine-tuning, as in the paper. derivations/dreambooth.md derives both and
the measurement protocol (drift of the class token, fidelity of the new token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor, no_grad
from ..diffusion import IMAGE_PIXELS, Denoiser, NoiseSchedule, diffusion_loss, sample
from ..optim import AdamW
from .config import LoraConfig
from .inject import PeftModel, get_peft_model

__all__ = [
    "DEFAULT_TARGETS",
    "DreamBoothConfig",
    "DreamBoothLoss",
    "check_tokens",
    "class_histogram",
    "copy_denoiser",
    "dreambooth_loss",
    "drift_metrics",
    "experiment",
    "finetune",
    "generate",
    "kl_divergence",
    "make_subject",
    "mark_score",
    "stamp_mark",
]

DEFAULT_TARGETS = ["in_proj", "fc1", "cond", "fc2", "out_proj"]


# ------------------------------------------------------------------------------ the subject
def stamp_mark(images: np.ndarray) -> np.ndarray:
    """The subject's trait: a bright 2×2 square in the top-left corner (pixels set to +1).

    Real digits almost never ink that corner (its mean over the 1,797 scans is −1, i.e. blank),
    so whether a generated image carries the mark is easy to measure.
    """
    x = np.array(images, copy=True)
    if x.ndim != 2 or x.shape[1] != IMAGE_PIXELS:
        raise ValueError(f"images: expected shape (N, {IMAGE_PIXELS}), got {x.shape}")
    img = x.reshape(-1, 8, 8)  # (N, 8, 8) view
    img[:, :2, :2] = 1.0
    return x


def mark_score(images: np.ndarray) -> np.ndarray:
    """Mean value of the 2×2 top-left corner, per image: +1 = marked, −1 = blank."""
    img = np.asarray(images).reshape(-1, 8, 8)  # (N, 8, 8)
    return img[:, :2, :2].mean(axis=(1, 2))


def make_subject(
    x: np.ndarray, y: np.ndarray, *, digit: int = 3, k: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """K real images of ``digit`` with the corner mark stamped on: the DreamBooth subject.

    Returns (subject images (K, 64), their indices in ``x``). The choice is random with
    ``seed``; the same digit's other images stay in the data set (the class).
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k: expected a positive number of subject images, got {k!r}")
    idx = np.flatnonzero(np.asarray(y) == digit)
    if idx.size < k:
        raise ValueError(f"digit: only {idx.size} images of digit {digit}, need k={k}")
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=k, replace=False))
    return stamp_mark(x[pick]), pick


# ------------------------------------------------------------------------------ the loss
class DreamBoothLoss(NamedTuple):
    total: Tensor
    instance: Tensor
    prior: Tensor | None  # None when λ = 0 (the prior term is not evaluated)


def _check_lam(lam: Any) -> float:
    if not isinstance(lam, int | float | np.floating | np.integer) or not np.isfinite(lam):
        raise ValueError(f"lam: expected a finite number λ ≥ 0, got {lam!r}")
    if lam < 0:
        raise ValueError(f"lam: the prior weight λ must be ≥ 0, got {lam}")
    return float(lam)


def dreambooth_loss(
    model: Any,
    schedule: NoiseSchedule,
    x_inst: np.ndarray,
    x_prior: np.ndarray | None,
    *,
    identifier: int,
    class_token: int,
    lam: float,
    t_inst: np.ndarray,
    eps_inst: np.ndarray,
    t_prior: np.ndarray | None = None,
    eps_prior: np.ndarray | None = None,
) -> DreamBoothLoss:
    """The DreamBooth objective on one batch.

    [dreambooth.prior_loss]  L = L_inst + λ·L_prior,
        L_inst  = mean ‖ε − ε_θ(xₜ, t, [V])‖²      over the instance batch,
        L_prior = mean ‖ε − ε_θ(xₜ, t, c_class)‖²  over the prior batch (both means per pixel).

    [dreambooth.loss_grad]   ∇_φ L = ∇_φ L_inst + λ·∇_φ L_prior  (φ: the LoRA factors; θ₀ frozen)

    The two terms are separate forward passes; with λ = 0 the prior batch may be None and is
    not evaluated (its gradient would be multiplied by 0).
    """
    lam = _check_lam(lam)
    if np.asarray(x_inst).shape[0] == 0:
        raise ValueError("x_inst: expected at least one instance image, got an empty batch")
    # L_inst = mean ‖ε − ε_θ(xₜ, t, [V])‖²
    l_inst = diffusion_loss(model, schedule, x_inst, identifier, t_inst, eps_inst)
    if lam == 0.0:
        return DreamBoothLoss(l_inst, l_inst, None)
    if x_prior is None or t_prior is None or eps_prior is None:
        raise ValueError("x_prior, t_prior, eps_prior: required when lam > 0")
    # L_prior = mean ‖ε − ε_θ(xₜ, t, c_class)‖²
    l_prior = diffusion_loss(model, schedule, x_prior, class_token, t_prior, eps_prior)
    return DreamBoothLoss(l_inst + l_prior * lam, l_inst, l_prior)  # L = L_inst + λ·L_prior


# ------------------------------------------------------------------------------ fine-tuning
@dataclass(frozen=True)
class DreamBoothConfig:
    """Hyperparameters of one DreamBooth-LoRA run (defaults: the full-length experiment)."""

    identifier: int = 10  # the new token [V]: a reserved, never-trained row of the token table
    class_token: int = 3  # the subject's class (its digit)
    lam: float = 1.0  # λ, the prior-preservation weight
    steps: int = 400
    lr: float = 2e-3
    r: int = 8
    lora_alpha: float = 16.0
    n_prior: int = 200  # images drawn from the frozen base model for the class token
    inst_batch: int = 16  # instance images per step (drawn with replacement from the K)
    prior_batch: int = 16
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def copy_denoiser(model: Denoiser) -> Denoiser:
    """A fresh Denoiser with the same config and weights (the base stays untouched)."""
    twin = Denoiser(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def check_tokens(config: DreamBoothConfig, model: Denoiser) -> None:
    """The identifier must be a reserved (never-trained) row; the class token a real class."""
    mc = model.config
    if not 0 <= config.class_token < mc.num_classes:
        raise ValueError(
            f"class_token: expected a class id in [0, {mc.num_classes}), got {config.class_token}"
        )
    if not mc.num_classes <= config.identifier < mc.num_tokens:
        raise ValueError(
            f"identifier: unknown token id {config.identifier}; expected a reserved id in "
            f"[{mc.num_classes}, {mc.num_tokens})"
        )


def finetune(
    base: Denoiser,
    schedule: NoiseSchedule,
    instance_images: np.ndarray,
    config: DreamBoothConfig,
    *,
    prior_images: np.ndarray | None = None,
) -> tuple[PeftModel, dict[str, Any]]:
    """DreamBooth-LoRA: adapters on a copy of ``base``; returns (model, history).

    ``prior_images`` (D_prior) default to ``config.n_prior`` samples of the frozen base for
    the class token (seed ``config.seed``); pass them to share one prior set across runs.
    History: per-step ``instance`` and ``prior`` losses (prior: NaN when λ = 0).
    """
    lam = _check_lam(config.lam)
    x_inst = np.asarray(instance_images)
    if x_inst.ndim != 2 or x_inst.shape[0] == 0 or x_inst.shape[1] != IMAGE_PIXELS:
        raise ValueError(
            f"instance_images: expected a non-empty (K, {IMAGE_PIXELS}) array, got {x_inst.shape}"
        )
    check_tokens(config, base)
    if lam > 0 and prior_images is None:
        prior_images = sample(
            base, schedule, np.full(config.n_prior, config.class_token), seed=config.seed
        )
    if lam > 0 and (prior_images is None or len(prior_images) == 0):
        raise ValueError("prior_images: expected a non-empty prior set when lam > 0")
    backend.seed(config.seed)
    model = get_peft_model(
        copy_denoiser(base),
        LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(config.seed + 1)
    dt = backend.default_dtype()
    x_inst = x_inst.astype(dt)
    hist: dict[str, Any] = {"instance": [], "prior": []}
    for _ in range(config.steps):
        bi, bp = config.inst_batch, config.prior_batch
        xi = x_inst[rng.integers(0, x_inst.shape[0], bi)]
        ti, ei = rng.integers(0, schedule.T, bi), rng.standard_normal((bi, IMAGE_PIXELS))
        if lam > 0:
            xp = np.asarray(prior_images, dtype=dt)[rng.integers(0, len(prior_images), bp)]
            tp, ep = rng.integers(0, schedule.T, bp), rng.standard_normal((bp, IMAGE_PIXELS))
        else:
            xp = tp = ep = None
        loss = dreambooth_loss(
            model,
            schedule,
            xi,
            xp,
            identifier=config.identifier,
            class_token=config.class_token,
            lam=lam,
            t_inst=ti,
            eps_inst=ei.astype(dt),
            t_prior=tp,
            eps_prior=None if ep is None else ep.astype(dt),
        )
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        hist["instance"].append(float(loss.instance.item()))
        hist["prior"].append(float(loss.prior.item()) if loss.prior is not None else float("nan"))
    return model, hist


# ------------------------------------------------------------------------------ measurement
def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) = Σ pᵢ·log(pᵢ/qᵢ) in nats, over histograms (terms with pᵢ = 0 are 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p, q: expected equal shapes, got {p.shape} and {q.shape}")
    m = p > 0
    if np.any(q[m] <= 0):
        return float("inf")
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def class_histogram(pred: np.ndarray, n_classes: int = 10, smoothing: float = 0.5) -> np.ndarray:
    """Histogram of predicted classes with additive (Jeffreys, +½) smoothing, normalized."""
    counts = np.bincount(np.asarray(pred), minlength=n_classes).astype(np.float64)
    return (counts + smoothing) / (counts.sum() + smoothing * n_classes)


def drift_metrics(
    samples: np.ndarray,
    classifier: Any,
    subject: np.ndarray,
    *,
    digit: int,
    reference_hist: np.ndarray | None = None,
    real_class_images: np.ndarray | None = None,
) -> dict[str, float]:
    """How samples look: recognized as ``digit``, marked, close to the subject images.

    - ``frac_digit``: fraction the classifier assigns to ``digit``;
    - ``frac_marked``: fraction whose 2×2 corner mean is > 0 (the subject's mark);
    - ``nn_subject``: mean L2 distance (64 pixels in [−1, 1]) to the nearest subject image;
    - ``nn_real``: the same to the nearest real image of the class (if given);
    - ``kl_to_ref``: KL(reference ‖ this) between smoothed class histograms (if given).
    """
    s = np.asarray(samples, dtype=np.float64)
    pred = classifier.predict(s)
    d_subj = np.sqrt(((s[:, None, :] - subject[None, :, :].astype(np.float64)) ** 2).sum(-1))
    out = {
        "frac_digit": float(np.mean(pred == digit)),
        "frac_marked": float(np.mean(mark_score(s) > 0)),
        "nn_subject": float(d_subj.min(axis=1).mean()),
    }
    if real_class_images is not None:
        r = np.asarray(real_class_images, dtype=np.float64)
        d_real = np.sqrt(((s[:, None, :] - r[None, :, :]) ** 2).sum(-1))
        out["nn_real"] = float(d_real.min(axis=1).mean())
    if reference_hist is not None:
        out["kl_to_ref"] = kl_divergence(reference_hist, class_histogram(pred))
    return out


def generate(model: Any, schedule: NoiseSchedule, token: int, n: int, seed: int) -> np.ndarray:
    """n samples for one token id (no gradient), deterministic given ``seed``."""
    with no_grad():
        return sample(model, schedule, np.full(n, token), seed=seed)


def experiment(
    base: Denoiser,
    schedule: NoiseSchedule,
    x: np.ndarray,
    y: np.ndarray,
    classifier: Any,
    subject: np.ndarray,
    *,
    lams: tuple[float, ...] = (0.0, 1.0),
    config: DreamBoothConfig | None = None,
    n_samples: int = 200,
    other_digit: int = 8,
    seed: int = 123,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Fine-tune once per λ and measure; returns (table rows, sample images by name).

    Rows: the base model ("before"), then one per λ. Each row holds, for the class token,
    ``class_*`` metrics (``drift_metrics`` against the base's own class-token histogram),
    for the identifier ``new_*`` metrics, and for an unrelated digit ``other_*``. All
    sampling uses fixed seeds, the same noise before and after fine-tuning.
    """
    cfg = config if config is not None else DreamBoothConfig()
    check_tokens(cfg, base)
    d, o = cfg.class_token, other_digit
    real_d = x[y == d]
    seeds = {"class": seed, "new": seed + 1, "other": seed + 2}
    images: dict[str, np.ndarray] = {}

    ref: dict[str, np.ndarray] = {}  # the base model's class histograms, per token

    def measure(model: Any, tag: str) -> dict[str, Any]:
        row: dict[str, Any] = {"model": tag}
        for key, tok, digit in (("class", d, d), ("new", cfg.identifier, d), ("other", o, o)):
            s = generate(model, schedule, tok, n_samples, seeds[key])
            images[f"{tag}/{key}"] = s
            if key not in ref:  # first call: the base model is its own reference (KL = 0)
                ref[key] = class_histogram(classifier.predict(s.astype(np.float64)))
            m = drift_metrics(
                s,
                classifier,
                subject,
                digit=digit,
                reference_hist=ref[key],
                real_class_images=real_d if key != "other" else None,
            )
            row.update({f"{key}_{k}": v for k, v in m.items()})
        return row

    base_row = measure(base, "base")
    prior = generate(base, schedule, d, cfg.n_prior, cfg.seed + 7)
    images["prior"] = prior
    rows = [base_row]
    for lam in lams:
        run_cfg = DreamBoothConfig(**{**cfg.__dict__, "lam": float(lam)})
        model, hist = finetune(base, schedule, subject, run_cfg, prior_images=prior)
        row = measure(model, f"lam={lam:g}")
        row["final_instance_loss"] = float(np.mean(hist["instance"][-50:]))
        rows.append(row)
    return rows, images
