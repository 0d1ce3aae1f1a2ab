"""AdaLoRA: SVD-parametrized adaptation with importance-driven rank allocation.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR 2023),
following Hugging Face PEFT's implementation (``peft.tuners.adalora``) in every convention
that changes a number, so that budgets, scores, masks and rank patterns agree with it
(derivations/adalora.md):

- ΔW = P·Λ·Q with PEFT's names: ``lora_A`` = Q (r, in) (right singular vectors, rows),
  ``lora_E`` = Λ as a column (r, 1), ``lora_B`` = P (out, r). The update is
  h = W₀x + c·P·(Λ ⊙ Q·x) with c = lora_alpha / (ranknum + 10⁻⁵), ranknum = the initial
  rank (it is not changed by masking). Λ starts at 0; P, Q ~ N(0, 0.02²).
- The orthogonal regularizer is PEFT's: the mean over all P and Q matrices of the
  *unsquared* Frobenius norms ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (the paper writes squared norms
  and sums them; the two differ in scale and gradient, see the derivation).
- Importance: I = |θ ⊙ ∂L/∂θ| for every entry of P, Λ, Q; Ī ← β₁Ī + (1−β₁)I;
  Ū ← β₂Ū + (1−β₂)|I − Ī| (with the updated Ī); score s = Ī ⊙ Ū. The triplet score of
  singular value i is s(Λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji).
- Budget: b(t) = b₀ during warm-up (t ≤ t_init), the cubic
  b(t) = ⌊(b₀ − b_T)(1 − (t − t_init)/(T − t_final − t_init))³ + b_T⌋ in between (masking
  every ΔT steps), b_T = target_r · (number of adapted matrices) afterwards.
- Masking: the k = b₀ − b(t) smallest triplet scores (all scores ≤ the k-th smallest)
  set their Λᵢ to 0; they stay trainable and may recover at the next allocation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Function, Tensor
from ..backend import Array
from ..nn.module import Module, Parameter
from .config import PeftConfig, check_adapter_name, check_int, check_real
from .lora import AdapterLayer, _AdapterDict, base_layout

__all__ = [
    "AdaLoraConfig",
    "RankAllocator",
    "SVDLinear",
    "budget_schedule",
    "orthogonal_penalty",
    "svd_delta",
    "triplet_scores",
]

_EPS_RANKNUM = 1e-5  # PEFT adds this to ranknum in the scaling


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA hyperparameters — HF PEFT's ``AdaLoraConfig`` names and defaults.

    ``rank_pattern`` maps ``"<module>.lora_E"`` to the kept triplets (a list of booleans),
    as PEFT writes it into ``adapter_config.json``. ``r`` is accepted and ignored, as PEFT
    does (the initial rank is ``init_r``).
    """

    peft_type: ClassVar[str] = "ADALORA"
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's (camel-case) name, kept so configs port unchanged
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = 8
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool = True
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias != "none" or self.use_rslora or self.use_dora or self.alpha_pattern:
            raise ValueError(
                "bias/use_rslora/use_dora/alpha_pattern: AdaLoRA supports none of these "
                f"(got bias={self.bias!r}, use_rslora={self.use_rslora}, "
                f"use_dora={self.use_dora}, alpha_pattern={self.alpha_pattern})"
            )
        if self.init_lora_weights is not True:
            raise ValueError(
                f"init_lora_weights: AdaLoRA initializes Λ = 0, P, Q ~ N(0, 0.02²); "
                f"got {self.init_lora_weights!r}"
            )
        check_int("target_r", self.target_r, 1)
        check_int("init_r", self.init_r, 1)
        check_int("r", self.r, 1)  # ignored, as in PEFT, but a rank all the same
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r: the target rank {self.target_r} exceeds the initial rank "
                f"init_r={self.init_r}; AdaLoRA can only prune"
            )
        check_int("tinit", self.tinit, 0)
        check_int("tfinal", self.tfinal, 0)
        check_int("deltaT", self.deltaT, 1)
        for name in ("beta1", "beta2"):
            check_real(name, getattr(self, name), low=0.0, high=1.0, low_open=True, high_open=True)
        check_real("orth_reg_weight", self.orth_reg_weight, low=0.0)
        if self.total_step is None:
            raise ValueError("total_step: expected a positive step count, got None")
        check_int("total_step", self.total_step, 1)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"total_step: {self.total_step} steps leave no budgeting phase after the "
                f"warm-up tinit={self.tinit} and before the final phase tfinal={self.tfinal} "
                f"(need total_step > tinit + tfinal)"
            )
        # PEFT's scaling uses ranknum when lora_alpha ≤ 0; minipeft refuses it, as for LoRA
        check_real("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_real("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise TypeError(
                    f"rank_pattern: expected a dict '<module>.lora_E' → list of booleans, got "
                    f"{type(self.rank_pattern).__name__}"
                )
            for k, keep in self.rank_pattern.items():
                if not isinstance(keep, list) or not all(isinstance(b, bool) for b in keep):
                    raise TypeError(
                        f"rank_pattern[{k!r}]: expected a list of booleans, got {keep!r}"
                    )
                if len(keep) != self.init_r:
                    raise ValueError(
                        f"rank_pattern[{k!r}]: expected init_r={self.init_r} booleans, got "
                        f"{len(keep)}"
                    )


# ---------------------------------------------------------------------------- the SVD update
class SVDDelta(Function):
    """y = c·((x·Qᵀ) ⊙ λᵀ)·Pᵀ and its closed-form VJP.   [adalora.grad]

    Shapes: x (N, in), Q = ``lora_A`` (r, in), λ = ``lora_E`` (r, 1), P = ``lora_B`` (out, r).
    With u = x·Qᵀ, v = u ⊙ λᵀ and upstream G = ∂L/∂y (N, out):

        ∂L/∂P = c·Gᵀ·v          ∂L/∂v = c·G·P
        ∂L/∂λ = Σₙ (∂L/∂v ⊙ u)ᵀ  ∂L/∂u = ∂L/∂v ⊙ λᵀ
        ∂L/∂Q = (∂L/∂u)ᵀ·x      ∂L/∂x = ∂L/∂u·Q
    """

    def forward(self, x: Array, q: Array, lam: Array, p: Array, c: float) -> Array:
        u = x @ q.T  # (N, r)
        v = u * lam.T  # (N, r)
        self.x, self.q, self.lam, self.p, self.u, self.v, self.c = x, q, lam, p, u, v, c
        return c * (v @ p.T)  # (N, out)

    def backward(self, g: Array) -> tuple[Array | None, ...]:
        need_x, need_q, need_lam, need_p = self.needs_input_grad
        gp = self.c * (g.T @ self.v) if need_p else None  # (out, r)
        gv = self.c * (g @ self.p)  # (N, r)
        glam = (gv * self.u).sum(axis=0)[:, None] if need_lam else None  # (r, 1)
        gu = gv * self.lam.T  # (N, r)
        gq = gu.T @ self.x if need_q else None  # (r, in)
        gx = gu @ self.q if need_x else None  # (N, in)
        return gx, gq, glam, gp


def svd_delta(x: Tensor, lora_A: Tensor, lora_E: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """AdaLoRA's low-rank update c·P·Λ·Q applied to x (..., in) → (..., out).   [adalora.forward]

    h_delta = scaling · x·(Q ⊙ λ)ᵀ·Pᵀ, i.e. PEFT's ``x @ (lora_A * lora_E).T @ lora_B.T * c``.
    """
    r, d_in = lora_A.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x: expected last dimension {d_in} (lora_A is {lora_A.shape}), got {x.shape}"
        )
    if lora_E.shape != (r, 1):
        raise ValueError(f"lora_E: expected shape ({r}, 1), got {lora_E.shape}")
    if lora_B.ndim != 2 or lora_B.shape[1] != r:
        raise ValueError(f"lora_B: expected shape (out, {r}), got {lora_B.shape}")
    lead = x.shape[:-1]
    flat = ops.reshape(x, (-1, d_in))  # (N, in)
    y = SVDDelta.apply(flat, lora_A, lora_E, lora_B, c=float(scaling))  # (N, out)
    return ops.reshape(y, (*lead, lora_B.shape[0]))


class OrthPenalty(Function):
    """‖M‖_F with M = QQᵀ − I (for Q) or PᵀP − I (for P), and its gradient.   [adalora.orth_grad]

    d‖M‖_F = ⟨M, dM⟩/‖M‖_F and M is symmetric, so
        for Q (r, in):  ∂‖QQᵀ − I‖_F/∂Q = 2·M·Q / ‖M‖_F
        for P (out, r): ∂‖PᵀP − I‖_F/∂P = 2·P·M / ‖M‖_F
    (undefined at M = 0, where we return 0 — the subgradient of smallest norm).
    """

    def forward(self, w: Array, rows: bool) -> Array:
        xp = backend.xp_of(w)
        gram = w @ w.T if rows else w.T @ w
        m = gram - xp.eye(gram.shape[0], dtype=w.dtype)
        norm = xp.sqrt((m * m).sum())
        self.w, self.m, self.norm, self.rows = w, m, norm, rows
        return norm

    def backward(self, g: Array) -> Array:
        if float(self.norm) == 0.0:
            return backend.xp_of(self.w).zeros_like(self.w)
        core = self.m @ self.w if self.rows else self.w @ self.m
        return g * 2.0 * core / self.norm


def orthogonal_penalty(lora_As: Iterable[Tensor], lora_Bs: Iterable[Tensor]) -> Tensor:
    """PEFT's regularizer R = (1/n)·(Σ ‖QQᵀ − I‖_F + Σ ‖PᵀP − I‖_F).   [adalora.orth_reg]

    ``lora_As`` are the Q matrices (r, in), ``lora_Bs`` the P matrices (out, r); n is the
    number of matrices. Unsquared norms, as HF PEFT (the paper writes squared norms).
    """
    terms = [OrthPenalty.apply(a, rows=True) for a in lora_As]
    terms += [OrthPenalty.apply(b, rows=False) for b in lora_Bs]
    if not terms:
        raise ValueError("lora_As/lora_Bs: expected at least one matrix")
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total * (1.0 / len(terms))


# ---------------------------------------------------------------------------- the layer
class SVDLinear(AdapterLayer):
    """A frozen base layer plus AdaLoRA's update: h = base(x) + c·P·Λ·Q·x.

    ``base`` is a Linear (weight (out, in)) or GPT-2's Conv1D (weight (in, out)); its
    parameters are frozen. Names follow HF PEFT — ``base_layer.weight``,
    ``lora_A.<adapter>`` (r, in), ``lora_E.<adapter>`` (r, 1), ``lora_B.<adapter>``
    (out, r) — so adapter files port unchanged. ``A``, ``E``, ``B`` are the Parameters.
    """

    def __init__(
        self, base: Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:  # fmt: skip
        super().__init__()
        in_f, out_f, self.fan_in_fan_out = base_layout(base)
        check_int("r", r, 1)
        check_adapter_name(adapter_name)
        self.base_layer = base
        base.requires_grad_(False)
        self.adapter_name = adapter_name
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.lora_alpha = float(lora_alpha)
        self.ranknum = float(r)  # fixed at the initial rank, as in PEFT (not saved)
        self.lora_dropout = float(lora_dropout)
        dt = base.weight.dtype
        gen = backend.rng()
        self.lora_A, self.lora_E, self.lora_B = _AdapterDict(), _AdapterDict(), _AdapterDict()
        q = gen.normal(0.0, 0.02, (r, in_f)).astype(dt)  # Q (r, in)
        p = gen.normal(0.0, 0.02, (out_f, r)).astype(dt)  # P (out, r)
        setattr(self.lora_A, adapter_name, Parameter(q))
        setattr(self.lora_E, adapter_name, Parameter(np.zeros((r, 1), dtype=dt)))  # Λ = 0
        setattr(self.lora_B, adapter_name, Parameter(p))
        self.disabled = False
        self.merged = False

    @property
    def A(self) -> Parameter:
        return getattr(self.lora_A, self.adapter_name)

    @property
    def E(self) -> Parameter:
        return getattr(self.lora_E, self.adapter_name)

    @property
    def B(self) -> Parameter:
        return getattr(self.lora_B, self.adapter_name)

    def param(self, kind: str) -> Parameter:
        """The Parameter named ``kind`` ∈ {"lora_A", "lora_E", "lora_B"} of the adapter."""
        if kind not in ("lora_A", "lora_E", "lora_B"):
            raise ValueError(f"kind: expected 'lora_A', 'lora_E' or 'lora_B', got {kind!r}")
        return getattr(getattr(self, kind), self.adapter_name)

    @property
    def scaling(self) -> float:
        """c = lora_alpha / (ranknum + 10⁻⁵) — PEFT's scaling (lora_alpha > 0)."""
        return (self.lora_alpha if self.lora_alpha > 0 else self.ranknum) / (
            self.ranknum + _EPS_RANKNUM
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_output(x)
        if h is not None:
            return h
        xd = ops.dropout(x, self.lora_dropout, self.training)
        return self.base_layer(x) + svd_delta(xd, self.A, self.E, self.B, self.scaling)

    def delta_weight(self) -> np.ndarray:
        """ΔW = c·P·(Λ ⊙ Q) in the base's layout ((out, in), or (in, out) for Conv1D)."""
        d = self.scaling * (self.B.data @ (self.A.data * self.E.data))  # (out, in)
        return d.T if self.fan_in_fan_out else d

    def merge(self) -> None:
        """W₀ ← W₀ + ΔW (exact inverse: ``unmerge``)."""
        if self.merged:
            return
        self.base_layer.weight.data += self.delta_weight().astype(self.base_layer.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.data -= self.delta_weight().astype(self.base_layer.weight.dtype)
        self.merged = False

    def resize(self, keep: list[bool]) -> None:
        """Keep only the triplets marked True (PEFT's ``resize_modules_by_rank_pattern``).

        ranknum stays at the initial rank, so the scaling — and the update — are unchanged.
        """
        kept = prune_to_rank_pattern(self, keep)
        self.r = int(np.count_nonzero(keep))  # 0 is allowed, as in PEFT: the update vanishes
        for kind in ("lora_A", "lora_E", "lora_B"):
            setattr(getattr(self, kind), self.adapter_name, Parameter(kept[kind]))

    def effective_rank(self) -> int:
        """Number of singular values Λᵢ that are not masked to zero."""
        return int(backend.xp_of(self.E.data).count_nonzero(self.E.data))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"


# ---------------------------------------------------------------------------- allocation
def budget_schedule(
    step: int, config: AdaLoraConfig, init_budget: int, target_budget: int
) -> tuple[int, bool]:
    """The rank budget b(t) and whether to mask at step t (cubic schedule).   [adalora.budget]

    b(t) = b₀ for t ≤ t_init (no masking);
    b(t) = b_T for t > T − t_final (always mask);
    else  b(t) = ⌊(b₀ − b_T)·(1 − (t − t_init)/(T − t_final − t_init))³ + b_T⌋,
          masking when t is a multiple of ΔT.
    """
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (mul**3) + target_budget), step % config.deltaT == 0


def triplet_scores(score_A: np.ndarray, score_E: np.ndarray, score_B: np.ndarray) -> np.ndarray:
    """S_i = s(Λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji) for one matrix.   [adalora.triplet]

    score_A (r, in), score_E (r, 1), score_B (out, r) → (r,).
    """
    return score_E.reshape(-1) + (score_A.mean(axis=1) + score_B.mean(axis=0))


@dataclass
class _Smoothed:
    ipt: np.ndarray
    exp_avg_ipt: np.ndarray
    exp_avg_unc: np.ndarray


class RankAllocator:
    """AdaLoRA's importance-driven budget allocation, in NumPy.

    ``layers`` maps a module name to its SVDLinear. Call ``update_and_allocate(step)``
    after ``backward`` and the optimizer step, before clearing gradients (PEFT's order).
    """

    def __init__(self, layers: Mapping[str, SVDLinear], config: AdaLoraConfig) -> None:
        if not layers:
            raise ValueError("layers: expected at least one SVDLinear to allocate ranks over")
        self.config = config
        self.layers = dict(sorted(layers.items()))
        self.init_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.state: dict[str, _Smoothed] = {}

    def _named(self) -> list[tuple[str, Parameter]]:
        out = []
        for name, layer in self.layers.items():
            for kind, p in (("lora_A", layer.A), ("lora_E", layer.E), ("lora_B", layer.B)):
                out.append((f"{name}.{kind}", p))
        return out

    def update_ipt(self) -> None:
        """Sensitivity I = |θ ⊙ ∇θ|, then the EMAs Ī and Ū.   [adalora.importance]

        Ī ← β₁·Ī + (1 − β₁)·I;   Ū ← β₂·Ū + (1 − β₂)·|I − Ī|   (Ī already updated).
        """
        b1, b2 = self.config.beta1, self.config.beta2
        for n, p in self._named():
            if p.grad is None:
                raise ValueError(f"{n}: has no gradient; call update_and_allocate after backward")
            st = self.state.get(n)
            xp = backend.xp_of(p.data)  # the scores live where the parameters do
            if st is None:
                z = xp.zeros_like(p.data)
                st = self.state[n] = _Smoothed(z, z.copy(), z.copy())
            st.ipt = xp.abs(p.data * p.grad)
            st.exp_avg_ipt = b1 * st.exp_avg_ipt + (1 - b1) * st.ipt
            st.exp_avg_unc = b2 * st.exp_avg_unc + (1 - b2) * xp.abs(st.ipt - st.exp_avg_ipt)

    def element_score(self, param_name: str) -> np.ndarray:
        """s = Ī ⊙ Ū for one parameter."""
        st = self.state[param_name]
        return st.exp_avg_ipt * st.exp_avg_unc

    def scores(self) -> dict[str, np.ndarray]:
        """Triplet scores (r,) for every adapted matrix."""
        return {
            name: triplet_scores(
                self.element_score(f"{name}.lora_A"),
                self.element_score(f"{name}.lora_E"),
                self.element_score(f"{name}.lora_B"),
            )
            for name in self.layers
        }

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the Λᵢ of the b₀ − b lowest triplets (ties at the threshold included)."""
        scores = self.scores()
        k = self.init_budget - budget
        if k < 1:
            raise ValueError(
                f"budget: {budget} leaves nothing to mask (initial budget {self.init_budget})"
            )
        xp = backend.xp_of(*scores.values())
        allv = xp.concatenate(list(scores.values()))
        threshold = xp.partition(allv, k - 1)[k - 1]  # the k-th smallest (torch.kthvalue)
        pattern = {}
        for name, s in scores.items():
            drop = s <= threshold
            self.layers[name].E.data[drop, 0] = 0.0
            pattern[name] = (~drop).tolist()
        return pattern

    def mask_using_rank_pattern(self, pattern: Mapping[str, list[bool]]) -> None:
        """Zero the dropped Λᵢ again (every step of the final phase): the boolean masks are
        moved to where Λ lives once per pattern, not at every step."""
        if getattr(self, "_masks_for", None) is not pattern:
            self._masks = {
                name: backend.like(~np.asarray(keep, dtype=bool), self.layers[name].E.data)
                for name, keep in pattern.items()
            }
            self._masks_for = pattern
        for name, drop in self._masks.items():
            self.layers[name].E.data[drop, 0] = 0.0

    def update_and_allocate(self, step: int) -> tuple[int | None, dict[str, list[bool]] | None]:
        """One allocation step with PEFT's phases; returns (budget, new rank pattern or None).

        ``step`` is the global step, an integer ≥ 0 (a negative or fractional step would
        land in the wrong phase and write a wrong rank pattern into the saved adapter).
        """
        check_int("step", step, 0)
        cfg = self.config
        final_start = cfg.total_step - cfg.tfinal
        if step < final_start:
            self.update_ipt()
            budget, mask = budget_schedule(step, cfg, self.init_budget, self.target_budget)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
                return budget, self.rank_pattern
            return budget, None
        if step == final_start:
            self.rank_pattern = self.mask_to_budget(self.target_budget)
            self.reset_ipt()
            return self.target_budget, self.rank_pattern
        if self.rank_pattern is not None:
            self.mask_using_rank_pattern(self.rank_pattern)
        return self.target_budget, None


def simplified_importance(layer: SVDLinear) -> np.ndarray:
    """The lecture's simplified score |λᵢ|·|∂L/∂λᵢ| (a labelled comparison, not AdaLoRA)."""
    if layer.E.grad is None:
        raise ValueError("layer: lora_E has no gradient yet")
    return backend.xp_of(layer.E.data).abs(layer.E.data[:, 0] * layer.E.grad[:, 0])


def prune_to_rank_pattern(layer: SVDLinear, keep: list[bool]) -> dict[str, np.ndarray]:
    """The adapter tensors restricted to the kept triplets (PEFT's saved format)."""
    idx = np.asarray(keep, dtype=bool)
    if idx.shape != (layer.r,):
        raise ValueError(f"keep: expected {layer.r} booleans, got {idx.shape}")
    idx = backend.like(idx, layer.E.data)  # indexes the adapter where it lives
    return {
        "lora_A": layer.A.data[idx],
        "lora_E": layer.E.data[idx],
        "lora_B": layer.B.data[:, idx],
    }
