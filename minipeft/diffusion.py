"""A small class-conditional DDPM on 8×8 digits, trained by minipeft (derivations/dreambooth.md).

Denoising diffusion (Ho et al., 2020) in one file: the noise schedule, the forward process,
the simplified ε-prediction loss, the ancestral sampler, a residual-MLP denoiser over the 64
pixels with time and token embeddings, the training loop, checkpoints and a digit classifier
that judges samples. It is the base model that ``minipeft.peft.dreambooth`` personalizes.

Indexing: arrays are 0-based, so ``t = 0 … T−1`` stands for the paper's steps 1 … T.
With αₜ = 1 − βₜ and ᾱₜ = ∏_{s≤t} α_s (and ᾱ₋₁ = 1):

    q(xₜ | x₀) = N(√ᾱₜ·x₀, (1 − ᾱₜ)·I)                                  [diffusion.q_closed_form]
    L_simple = E_{x₀,ε,t} ‖ε − ε_θ(√ᾱₜ·x₀ + √(1−ᾱₜ)·ε, t, c)‖²           [diffusion.simple_loss]
    q(x_{t−1} | xₜ, x₀) = N(μ̃ₜ, β̃ₜ·I),
        μ̃ₜ = √ᾱ_{t−1}βₜ/(1−ᾱₜ)·x₀ + √αₜ(1−ᾱ_{t−1})/(1−ᾱₜ)·xₜ,
        β̃ₜ = (1−ᾱ_{t−1})/(1−ᾱₜ)·βₜ                                     [diffusion.posterior]
    x_{t−1} = 1/√αₜ·(xₜ − βₜ/√(1−ᾱₜ)·ε_θ) + σₜ·z,  σₜ² = β̃ₜ            [diffusion.sampler_step]

Images: sklearn's 8×8 digits (1,797 real scans, values 0…16) scaled to x = v/8 − 1 ∈ [−1, 1].
Tokens: ids 0…9 are the digit classes; ``num_reserved`` more rows of the token table are never
trained by ``pretrain`` — a new identifier (DreamBooth's rare token) takes one of them.

Run ``python -m minipeft pretrain-diffusion --out FILE`` to train and save a base model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import backend
from .autograd import ops
from .autograd.tensor import Tensor, data_of, input_array, no_grad
from .io import atomic_write
from .nn.layers import Embedding, LayerNorm, Linear, check_positive_int
from .nn.module import Module, ModuleList
from .optim import AdamW

__all__ = [
    "Denoiser",
    "DiffusionConfig",
    "NoiseSchedule",
    "PretrainConfig",
    "ResBlock",
    "diffusion_loss",
    "digit_classifier",
    "load_denoiser",
    "load_digits",
    "pretrain",
    "read_checkpoint_metadata",
    "sample",
    "save_denoiser",
    "timestep_embedding",
]

IMAGE_PIXELS = 64  # 8 × 8


# ------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DiffusionConfig:
    """Shape of the denoiser and of the noise schedule."""

    num_classes: int = 10  # token ids 0…9: the digits
    num_reserved: int = 6  # token ids 10…15: never trained by pretrain (new identifiers)
    hidden: int = 128  # residual stream width
    mlp_hidden: int = 256  # width inside each residual block
    n_blocks: int = 3
    time_dim: int = 64  # sinusoidal time features
    T: int = 100  # diffusion steps
    schedule: str = "cosine"  # "cosine" (Nichol & Dhariwal, 2021) or "linear" (Ho et al.)

    def __post_init__(self) -> None:
        for name in ("num_classes", "hidden", "mlp_hidden", "n_blocks", "time_dim", "T"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.num_reserved, int) or self.num_reserved < 0:
            raise ValueError(f"num_reserved: expected an integer ≥ 0, got {self.num_reserved!r}")
        if self.time_dim % 2:
            raise ValueError(f"time_dim: expected an even number, got {self.time_dim}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule: expected 'cosine' or 'linear', got {self.schedule!r}")

    @property
    def num_tokens(self) -> int:
        return self.num_classes + self.num_reserved


# ------------------------------------------------------------------------------ schedule
class NoiseSchedule:
    """βₜ, αₜ = 1 − βₜ, ᾱₜ = ∏ α_s (float64), and the closed forms built on them."""

    def __init__(self, T: int = 100, kind: str = "cosine") -> None:
        self.T = check_positive_int("T", T)
        if kind == "linear":
            # Ho et al.: β from 1e-4 to 0.02 over 1000 steps; rescaled by 1000/T for fewer steps
            scale = 1000.0 / self.T
            betas = np.linspace(1e-4 * scale, 0.02 * scale, self.T)
        elif kind == "cosine":
            # Nichol & Dhariwal: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s)·π/2), s = 0.008
            s = 0.008
            steps = np.arange(self.T + 1, dtype=np.float64) / self.T
            f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)  # βₜ = 1 − ᾱₜ/ᾱₜ₋₁
        else:
            raise ValueError(f"kind: expected 'cosine' or 'linear', got {kind!r}")
        if np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError(f"T: the {kind} schedule gives β outside (0, 1) for T={self.T}")
        self.kind = kind
        self.betas = betas  # (T,)
        self.alphas = 1.0 - betas  # αₜ = 1 − βₜ
        self.alpha_bar = np.cumprod(self.alphas)  # ᾱₜ = ∏_{s≤t} α_s
        self.alpha_bar_prev = np.concatenate([[1.0], self.alpha_bar[:-1]])  # ᾱₜ₋₁, ᾱ₋₁ = 1

    def _t(self, t: Any) -> np.ndarray:
        t = np.asarray(t)
        if t.dtype.kind not in "iu":
            raise TypeError(f"t: expected integer time steps, got dtype {t.dtype}")
        if t.size and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"t: expected steps in [0, {self.T - 1}], got {t.min()}…{t.max()}")
        return t

    def q_mean_var(self, x0: np.ndarray, t: Any) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of q(xₜ | x₀) in closed form.

        [diffusion.q_closed_form]  q(xₜ | x₀) = N(√ᾱₜ·x₀, (1 − ᾱₜ)·I)
        ``x0`` is (N, D), ``t`` (N,); returns mean (N, D) and variance (N, 1).
        """
        t = self._t(t)
        ab = self.alpha_bar[t][:, None]  # (N, 1)
        return np.sqrt(ab) * x0, 1.0 - ab  # √ᾱₜ·x₀,  1 − ᾱₜ

    def q_sample(self, x0: np.ndarray, t: Any, eps: np.ndarray) -> np.ndarray:
        """xₜ = √ᾱₜ·x₀ + √(1 − ᾱₜ)·ε  — a draw from q(xₜ | x₀) given ε ~ N(0, I)."""
        t = self._t(t)
        ab = self.alpha_bar[t][:, None]  # (N, 1)
        out = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps  # xₜ = √ᾱₜ·x₀ + √(1−ᾱₜ)·ε
        return out.astype(np.result_type(x0, eps), copy=False)

    def posterior_mean_var(
        self, x0: np.ndarray, xt: np.ndarray, t: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of q(x_{t−1} | xₜ, x₀).

        [diffusion.posterior]
        μ̃ₜ = √ᾱ_{t−1}·βₜ/(1−ᾱₜ)·x₀ + √αₜ·(1−ᾱ_{t−1})/(1−ᾱₜ)·xₜ,  β̃ₜ = (1−ᾱ_{t−1})/(1−ᾱₜ)·βₜ
        """
        t = self._t(t)
        b, a = self.betas[t][:, None], self.alphas[t][:, None]  # (N, 1)
        ab, abp = self.alpha_bar[t][:, None], self.alpha_bar_prev[t][:, None]
        c0 = np.sqrt(abp) * b / (1.0 - ab)  # √ᾱ_{t−1}·βₜ/(1−ᾱₜ)
        ct = np.sqrt(a) * (1.0 - abp) / (1.0 - ab)  # √αₜ·(1−ᾱ_{t−1})/(1−ᾱₜ)
        var = (1.0 - abp) / (1.0 - ab) * b  # β̃ₜ
        return c0 * x0 + ct * xt, var

    def predict_x0(self, xt: np.ndarray, t: Any, eps: np.ndarray) -> np.ndarray:
        """x̂₀ = (xₜ − √(1−ᾱₜ)·ε)/√ᾱₜ  — the forward process solved for x₀."""
        t = self._t(t)
        ab = self.alpha_bar[t][:, None]  # (N, 1)
        return (xt - np.sqrt(1.0 - ab) * eps) / np.sqrt(ab)

    def sampler_step(
        self, xt: np.ndarray, t: int, eps_hat: np.ndarray, z: np.ndarray, *, clip_x0: bool = False
    ) -> np.ndarray:
        """One ancestral DDPM step xₜ → x_{t−1} (all rows at the same step ``t``).

        [diffusion.sampler_step]
        x_{t−1} = 1/√αₜ·(xₜ − βₜ/√(1−ᾱₜ)·ε̂) + σₜ·z,   σₜ² = β̃ₜ (0 at the last step, t = 0)

        With ``clip_x0`` the mean is instead μ̃ₜ(clip(x̂₀, −1, 1), xₜ): the same value when
        x̂₀ already lies in [−1, 1] (the two forms are equal, derivations/dreambooth.md).
        """
        if not 0 <= int(t) < self.T:
            raise ValueError(f"t: expected a step in [0, {self.T - 1}], got {t}")
        t = int(t)
        a, b, ab = self.alphas[t], self.betas[t], self.alpha_bar[t]
        var = (1.0 - self.alpha_bar_prev[t]) / (1.0 - ab) * b  # σₜ² = β̃ₜ
        if clip_x0:
            tt = np.full(xt.shape[0], t)
            x0 = np.clip(self.predict_x0(xt, tt, eps_hat), -1.0, 1.0)
            mean, _ = self.posterior_mean_var(x0, xt, tt)
        else:
            mean = (xt - b / np.sqrt(1.0 - ab) * eps_hat) / np.sqrt(a)  # 1/√αₜ·(xₜ − βₜ/√(1−ᾱₜ)·ε̂)
        out = mean + math.sqrt(var) * z  # + σₜ·z
        return out.astype(xt.dtype, copy=False)


# ------------------------------------------------------------------------------ the denoiser
def timestep_embedding(
    t: Any, dim: int, max_period: float = 10_000.0, dtype: Any = None
) -> np.ndarray:
    """Sinusoidal features of the step (Vaswani et al.; DDPM): [cos(t·ωᵢ), sin(t·ωᵢ)].

    ωᵢ = max_period^(−i/(dim/2)), i = 0 … dim/2 − 1. Returns (N, dim) in ``dtype``
    (default: minipeft's default dtype).
    """
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half)  # ωᵢ   (dim/2,)
    args = np.asarray(t, dtype=np.float64)[:, None] * freqs[None, :]  # (N, dim/2)
    out = np.concatenate([np.cos(args), np.sin(args)], axis=1)  # (N, dim)
    return out.astype(dtype if dtype is not None else backend.default_dtype())


class ResBlock(Module):
    """h ← h + fc2(GELU(fc1(LN(h)) + cond(c)))  — a pre-LN residual MLP block with conditioning."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ln = LayerNorm(hidden)
        self.fc1 = Linear(hidden, mlp_hidden)
        self.cond = Linear(hidden, mlp_hidden)
        self.fc2 = Linear(mlp_hidden, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        u = ops.gelu(self.fc1(self.ln(h)) + self.cond(c))  # (B, mlp_hidden)
        return h + self.fc2(u)  # (B, hidden)


class Denoiser(Module):
    """ε_θ(xₜ, t, c): a residual MLP over the 64 pixels with time and token embeddings.

    c = time_mlp(sinusoid(t)) + token_emb[c]; h = in_proj(xₜ); n_blocks ``ResBlock``s, each
    reading GELU(c); ε̂ = out_proj(LN(h)). Every projection is a ``Linear`` (LoRA targets).
    """

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else DiffusionConfig()
        self.config = cfg
        h = cfg.hidden
        self.token_emb = Embedding(cfg.num_tokens, h, std=1.0)
        self.time_fc1 = Linear(cfg.time_dim, h)
        self.time_fc2 = Linear(h, h)
        self.in_proj = Linear(IMAGE_PIXELS, h)
        self.blocks = ModuleList([ResBlock(h, cfg.mlp_hidden) for _ in range(cfg.n_blocks)])
        self.ln_f = LayerNorm(h)
        self.out_proj = Linear(h, IMAGE_PIXELS)

    def check_tokens(self, tokens: Any, n: int) -> np.ndarray:
        """Validate token ids: integers in [0, num_tokens), one per image (or a scalar)."""
        tok = backend.to_numpy(data_of(tokens))  # a few ids, checked on the host
        if tok.dtype.kind not in "iu":
            raise TypeError(f"tokens: expected integer token ids, got dtype {tok.dtype}")
        if tok.ndim == 0:
            tok = np.full(n, int(tok))
        if tok.shape != (n,):
            raise ValueError(f"tokens: expected shape ({n},), got {tok.shape}")
        bad = (tok < 0) | (tok >= self.config.num_tokens)
        if bad.any():
            raise ValueError(
                f"tokens: unknown token id {int(tok[bad][0])}; "
                f"expected ids in [0, {self.config.num_tokens})"
            )
        return tok.astype(np.int64)

    def forward(self, xt: Tensor, t: Any, tokens: Any) -> Tensor:
        # inputs given on the host are moved once to where the model lives
        ref = self.token_emb.weight.data  # (in_proj may be wrapped by an adapter)
        if not isinstance(xt, Tensor):
            xt = Tensor(backend.like(input_array(xt), ref))
        elif not xt.requires_grad and xt.placement() != backend.placement(ref):
            xt = Tensor(backend.like(xt.data, ref))
        if xt.ndim != 2 or xt.shape[1] != IMAGE_PIXELS:
            raise ValueError(f"xt: expected shape (B, {IMAGE_PIXELS}), got {xt.shape}")
        n = xt.shape[0]
        t = backend.to_numpy(data_of(t))  # the steps: features are computed on the host
        if t.ndim == 0:
            t = np.full(n, int(t))
        if t.shape != (n,):
            raise ValueError(f"t: expected shape ({n},), got {t.shape}")
        tok = self.check_tokens(tokens, n)
        temb = timestep_embedding(t, self.config.time_dim, dtype=xt.dtype)  # (B, time)
        temb = Tensor(backend.like(temb, ref))
        tok_emb = ops.embedding(self.token_emb.weight, backend.like(tok, ref), check_range=False)
        c = self.time_fc2(ops.gelu(self.time_fc1(temb))) + tok_emb
        c = ops.gelu(c)  # (B, hidden)
        h = self.in_proj(xt)  # (B, hidden)
        for block in self.blocks:
            h = block(h, c)
        return self.out_proj(self.ln_f(h))  # ε̂   (B, 64)


# ------------------------------------------------------------------------------ loss, sampler
def diffusion_loss(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x0: np.ndarray,
    tokens: Any,
    t: Any,
    eps: np.ndarray,
) -> Tensor:
    """The simplified DDPM objective on one batch, as a differentiable scalar.

    [diffusion.simple_loss]  L = 1/(N·D)·Σ ‖ε − ε_θ(√ᾱₜ·x₀ + √(1−ᾱₜ)·ε, t, c)‖²

    Its gradient with respect to the network output is ∂L/∂ε̂ = 2(ε̂ − ε)/(N·D).
    """
    x0 = backend.to_numpy(data_of(x0))  # the schedule's arithmetic is float64 on the host
    eps = backend.to_numpy(data_of(eps))
    if x0.ndim != 2 or eps.shape != x0.shape:
        raise ValueError(f"x0, eps: expected equal (N, D) shapes, got {x0.shape} and {eps.shape}")
    if x0.shape[0] == 0:
        raise ValueError("x0: expected at least one image, got an empty batch")
    xt = schedule.q_sample(x0, t, eps)  # xₜ = √ᾱₜ·x₀ + √(1−ᾱₜ)·ε
    eps_hat = model(Tensor(xt), t, tokens)  # ε̂ = ε_θ(xₜ, t, c)   (N, D)
    diff = eps_hat - Tensor(backend.like(eps.astype(eps_hat.dtype, copy=False), eps_hat.data))
    return (diff * diff).mean()  # 1/(N·D)·Σ (ε̂ − ε)²


def sample(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    tokens: Any,
    *,
    seed: int = 0,
    clip_x0: bool = True,
    batch: int = 512,
) -> np.ndarray:
    """Draw images by ancestral sampling from x_T ~ N(0, I), one image per token id.

    Deterministic given ``seed`` (its own generator; minipeft's global one is untouched).
    Returns (N, 64) in the default dtype; values are clipped to [−1, 1] at the end.
    """
    tok = np.atleast_1d(np.asarray(tokens))
    n = tok.shape[0]
    if n == 0:
        raise ValueError("tokens: expected at least one token id, got none")
    rng = np.random.default_rng(seed)
    dt = backend.default_dtype()
    x = rng.standard_normal((n, IMAGE_PIXELS)).astype(dt)  # x_T ~ N(0, I)
    with no_grad():
        for t in range(schedule.T - 1, -1, -1):
            z = rng.standard_normal(x.shape).astype(dt)
            eps = np.concatenate(
                [
                    # the sampler's arithmetic runs on the host: ε̂ is copied back per step
                    backend.to_numpy(model(Tensor(x[i : i + batch]), t, tok[i : i + batch]).data)
                    for i in range(0, n, batch)
                ]
            )
            x = schedule.sampler_step(x, t, eps.astype(dt), z, clip_x0=clip_x0)
    return np.clip(x, -1.0, 1.0)


# ------------------------------------------------------------------------------ data
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits: X (1797, 64) scaled to v/8 − 1 ∈ [−1, 1], labels y (1797,)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn (pip install 'minipeft[notebooks]')"
        ) from e
    d = _load()
    x = (d.data / 8.0 - 1.0).astype(backend.default_dtype())  # 0…16 → −1…1
    return x, d.target.astype(np.int64)


def digit_classifier(
    x: np.ndarray, y: np.ndarray, *, seed: int = 0, test_fraction: float = 0.3
) -> tuple[Any, float]:
    """Logistic regression on the real digits; returns (classifier, held-out accuracy).

    The classifier judges generated samples: ``clf.predict_proba(samples)`` (N, 10).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(xtr.astype(np.float64), ytr)
    acc = float((clf.predict(xte.astype(np.float64)) == yte).mean())
    return clf, acc


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class PretrainConfig:
    """Training hyperparameters of the base model (the defaults are the full-length run)."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0


def pretrain(
    config: DiffusionConfig | None = None,
    train: PretrainConfig | None = None,
    *,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    log_every: int = 0,
) -> tuple[Denoiser, NoiseSchedule, list[float]]:
    """Train ``Denoiser`` on the digits with L_simple (AdamW, cosine decay); deterministic.

    Returns the model, its schedule and the per-step losses. Reserved token rows stay at
    their initialization (only ids 0…9 are ever used).
    """
    cfg = config if config is not None else DiffusionConfig()
    tr = train if train is not None else PretrainConfig()
    x, y = data if data is not None else load_digits()
    backend.seed(tr.seed)
    model = Denoiser(cfg)
    sched = NoiseSchedule(cfg.T, cfg.schedule)
    opt = AdamW(list(model.parameters()), lr=tr.lr, weight_decay=tr.weight_decay)
    rng = np.random.default_rng(tr.seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(tr.steps):
        idx = rng.integers(0, x.shape[0], tr.batch_size)
        t = rng.integers(0, sched.T, tr.batch_size)
        eps = rng.standard_normal((tr.batch_size, IMAGE_PIXELS)).astype(x.dtype)
        for g in opt.param_groups:  # cosine decay of the learning rate to 0
            g["lr"] = tr.lr * 0.5 * (1 + math.cos(math.pi * step / tr.steps))
        loss = diffusion_loss(model, sched, x[idx], y[idx], t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if log_every and (step + 1) % log_every == 0:
            recent = float(np.mean(losses[-log_every:]))
            print(
                f"step {step + 1}/{tr.steps}  loss {recent:.4f}  {time.perf_counter() - start:.0f}s"
            )
    return model, sched, losses


# ------------------------------------------------------------------------------ files
def save_denoiser(path: str | os.PathLike, model: Denoiser, extra: dict | None = None) -> None:
    """Write the weights as safetensors with the config (JSON) in the metadata; atomic.

    A model file (config + weights), not a resumable training state: that is
    ``minipeft.train.save_checkpoint`` (trainable tensors, optimizer, progress).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    meta = {"config": json.dumps(asdict(model.config), sort_keys=True)}
    if extra:
        meta["extra"] = json.dumps(extra, sort_keys=True)
    tensors = {k: np.ascontiguousarray(backend.to_numpy(v)) for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config (and ``extra`` training record) without loading weights.

    Reads the safetensors header only (validated: ``minipeft.models.io``); errors name the
    file: FileNotFoundError, or a ValueError (``CheckpointError``) for a file that is not a
    minipeft diffusion checkpoint or whose JSON metadata is invalid.
    """
    from .models.io import CheckpointError, loads_json, read_safetensors_header

    meta = read_safetensors_header(path).get("__metadata__") or {}
    if "config" not in meta:
        raise ValueError(f"path: {path} has no 'config' metadata; not a minipeft diffusion file")
    out = {"config": loads_json(meta["config"], f"{path}: metadata 'config'")}
    if not isinstance(out["config"], dict):
        raise CheckpointError(f"{path}: metadata 'config' must be a JSON object")
    if "extra" in meta:
        out["extra"] = loads_json(meta["extra"], f"{path}: metadata 'extra'")
    return out


_MAX_T = 100_000  # diffusion steps: DDPM uses 1000; a larger T is a corrupt file


def load_denoiser(path: str | os.PathLike) -> tuple[Denoiser, NoiseSchedule]:
    """Rebuild the denoiser from a file written by ``save_denoiser``.

    The config is checked against the file's tensor shapes before the model is built (so a
    config claiming a huge width allocates nothing) and every tensor's name, shape and
    dtype before any is copied in; errors name the file.
    """
    from .models.io import CheckpointError, check_config_sizes, check_tensors, load_safetensors

    meta = read_checkpoint_metadata(path)
    fields = {f.name for f in dataclasses.fields(DiffusionConfig)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise CheckpointError(
            f"{path}: config: unknown key(s) {unknown} (fields: {sorted(fields)})"
        )
    try:
        cfg = DiffusionConfig(**meta["config"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{path}: config: {exc}") from None
    if any(isinstance(v, bool) for v in meta["config"].values()):
        raise CheckpointError(
            f"{path}: config: expected integers, got a boolean in {meta['config']}"
        )
    if cfg.T > _MAX_T:
        raise CheckpointError(f"{path}: config: T: expected at most {_MAX_T} steps, got {cfg.T}")
    check_config_sizes(
        path,
        path,
        {
            "token_emb.weight": (
                ("num_classes + num_reserved", cfg.num_tokens),
                ("hidden", cfg.hidden),
            ),
            "time_fc1.weight": (("hidden", cfg.hidden), ("time_dim", cfg.time_dim)),
            "blocks.0.fc1.weight": (("mlp_hidden", cfg.mlp_hidden), ("hidden", cfg.hidden)),
        },
        ("blocks.", "n_blocks", cfg.n_blocks),
    )
    model = Denoiser(cfg)
    tensors = load_safetensors(path)
    check_tensors(tensors, {k: v.shape for k, v in model.state_dict().items()}, source=path)
    bad = {k: str(v.dtype) for k, v in tensors.items() if v.dtype.kind != "f"}
    if bad:
        raise CheckpointError(f"{path}: expected floating tensors, got {bad}")
    model.load_state_dict(tensors)
    return model, NoiseSchedule(cfg.T, cfg.schedule)


# ------------------------------------------------------------------------------ command line
def _main(argv: list[str] | None = None) -> int:
    """``python -m minipeft.diffusion pretrain …``: the older spelling of
    ``python -m minipeft pretrain-diffusion …`` (``minipeft.cli.pretrain_diffusion``)."""
    import sys

    from .__main__ import main

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["pretrain"]:
        args = args[1:]
    return main(["pretrain-diffusion", *args])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
