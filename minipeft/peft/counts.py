"""Trainable-parameter counts of fine-tuning methods, computed (derivations/lora_counts.md).

Per weight matrix W (d_out, d_in) — d = d_out, k = d_in in the LoRA paper's notation:

    full fine-tuning     d·k
    LoRA, rank r         r·(d + k)                 A (r, k) and B (d, r)
    reduction            d·k / (r·(d + k))   = d/(2r) when d = k        [counts.lora_reduction]
    VeRA                 d + r                     b ∈ ℝ^d, d ∈ ℝ^r (ERRATA 11) [counts.vera]

For n tasks sharing one base matrix (the lecture's multi-task example):

    n separate full copies / (base + n adapters) = n·d·k / (d·k + n·r·(d + k))
                                                                          [counts.multitask]

Whole-model formulas of the LoRA paper (Hu et al., 2021, §5.1 baselines) with model width
d_model, L layers, L̂ adapted matrices / adapter layers / trainable LayerNorms:

    LoRA           |Θ| = 2·L̂_LoRA·d_model·r                 (square matrices, d = k = d_model)
    AdapterH/L     |Θ| = L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model
    PreEmbed       |Θ| = d_model·(l_p + l_i)
    PreLayer       |Θ| = L·d_model·(l_p + l_i)
    BitFit         the number of bias entries                          [counts.paper_formulas]

``lecture_errata5`` recomputes the lecture's reduction claims (ERRATA 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction

import numpy as np

__all__ = [
    "adapter_params",
    "bitfit_params",
    "count_params",
    "full_params",
    "lecture_errata5",
    "lora_model_params",
    "lora_params",
    "lora_reduction",
    "multitask_reduction",
    "paper_lora_params",
    "prefix_embedding_params",
    "prefix_layer_params",
    "vera_params",
]


def _pos(name: str, value: int, allow_zero: bool = False) -> int:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name}: expected {kind} integer, got {value!r}")
    return int(value)


def full_params(d_out: int, d_in: int) -> int:
    """d·k: the entries of one weight matrix (full fine-tuning trains all of them)."""
    return _pos("d_out", d_out) * _pos("d_in", d_in)


def lora_params(d_out: int, d_in: int, r: int) -> int:
    """r·(d + k): A (r, d_in) plus B (d_out, r)."""
    return _pos("r", r) * (_pos("d_out", d_out) + _pos("d_in", d_in))


def lora_reduction(d_out: int, d_in: int, r: int) -> Fraction:
    """d·k / (r·(d + k)), exactly (a Fraction) — [counts.lora_reduction]. d/(2r) if d = k."""
    return Fraction(full_params(d_out, d_in), lora_params(d_out, d_in, r))


def multitask_reduction(n_tasks: int, d_out: int, d_in: int, r: int) -> Fraction:
    """n·d·k / (d·k + n·r·(d + k)) — [counts.multitask].

    n fully fine-tuned copies of the matrix against one shared base plus n adapters."""
    n = _pos("n_tasks", n_tasks)
    dk = full_params(d_out, d_in)
    return Fraction(n * dk, dk + n * lora_params(d_out, d_in, r))


def vera_params(d_out: int, r: int) -> int:
    """d_out + r per adapted matrix: VeRA's trainable vectors b (d_out) and d (r) — [counts.vera].

    A (r, d_in) and B (d_out, r) are frozen random matrices shared by all layers (and
    regenerated from a seed), so they are not trainable parameters."""
    return _pos("d_out", d_out) + _pos("r", r)


def paper_lora_params(n_matrices: int, d_model: int, r: int) -> int:
    """2·L̂_LoRA·d_model·r: the LoRA paper's count for L̂ square (d_model × d_model) matrices."""
    return 2 * _pos("n_matrices", n_matrices) * _pos("d_model", d_model) * _pos("r", r)


def adapter_params(n_adapter_layers: int, d_model: int, r: int, n_layernorm: int = 0) -> int:
    """L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model — [counts.paper_formulas].

    One adapter layer is a down-projection (d_model → r, weights and bias: d_model·r + r) and
    an up-projection (r → d_model: r·d_model + d_model); each trainable LayerNorm has a gain
    and a bias (2·d_model). AdapterH (Houlsby) has two adapter layers per block, AdapterL
    (Lin) one."""
    L_a = _pos("n_adapter_layers", n_adapter_layers)
    d = _pos("d_model", d_model)
    return L_a * (2 * d * _pos("r", r) + r + d) + 2 * _pos("n_layernorm", n_layernorm, True) * d


def prefix_embedding_params(d_model: int, l_p: int, l_i: int = 0) -> int:
    """d_model·(l_p + l_i): trainable embeddings of l_p prefix and l_i infix tokens."""
    return _pos("d_model", d_model) * (_pos("l_p", l_p, True) + _pos("l_i", l_i, True))


def prefix_layer_params(n_layers: int, d_model: int, l_p: int, l_i: int = 0) -> int:
    """L·d_model·(l_p + l_i): the prefix/infix activations learned at every layer."""
    return _pos("n_layers", n_layers) * prefix_embedding_params(d_model, l_p, l_i)


def count_params(
    named_shapes: Mapping[str, Iterable[int]], predicate: Callable[[str], bool] | None = None
) -> int:
    """Σ of prod(shape) over the names accepted by ``predicate`` (all names by default)."""
    total = 0
    for name, shape in named_shapes.items():
        if predicate is None or predicate(name):
            total += int(np.prod(tuple(shape), dtype=np.int64))
    return total


def bitfit_params(named_shapes: Mapping[str, Iterable[int]]) -> int:
    """BitFit (Ben Zaken et al., 2022) trains only bias vectors: entries of names '…bias'."""
    return count_params(named_shapes, lambda n: n == "bias" or n.endswith(".bias"))


def lora_model_params(
    named_shapes: Mapping[str, Iterable[int]], target: Callable[[str], bool], r: int
) -> int:
    """Σ r·(d_out + d_in) over the 2-D weights whose name ``target`` accepts (either layout:
    (out, in) for Linear or (in, out) for GPT-2's Conv1D gives the same count)."""
    total = 0
    for name, shape in named_shapes.items():
        shape = tuple(shape)
        if target(name) and len(shape) == 2:
            total += lora_params(shape[0], shape[1], r)
    return total


def lecture_errata5() -> list[dict[str, object]]:
    """The lecture's reduction claims next to the value of its own formula (ERRATA 5, 11)."""
    rows = [
        ("LoRA, d=k=512, r=8 (1.1)", 32, lora_reduction(512, 512, 8)),
        ("LoRA, d=k=4096, r=8 (3.1.2)", 256, lora_reduction(4096, 4096, 8)),
        ("GPT-3 d=k=12288, r=4 (3.1.2)", 6144, lora_reduction(12288, 12288, 4)),
        ("3 tasks, d=k=512, r=8 (1.3)", 24, multitask_reduction(3, 512, 512, 8)),
        (
            "VeRA vs full, d=k=4096, r=8 (3.9.3)",
            2048,
            Fraction(full_params(4096, 4096), vera_params(4096, 8)),
        ),
        (
            "VeRA vs LoRA, d=k=4096, r=8 (3.9.3)",
            8,
            Fraction(lora_params(4096, 4096, 8), vera_params(4096, 8)),
        ),
    ]
    return [
        {"claim": c, "lecture": lec, "computed": float(v), "right": abs(float(v) - lec) < 0.5}
        for c, lec, v in rows
    ]
