"""Checks for derivations/lora_counts.md: parameter counts against closed forms and the
sizes published in the LoRA paper (Hu et al., 2021, Tables 4 and 5) for GPT-3 175B."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ...peft.counts import (
    adapter_params,
    lora_reduction,
    multitask_reduction,
    paper_lora_params,
    vera_params,
)
from ..registry import Outcome, equation


@equation(
    "counts.lora_reduction",
    what="d·k / (r·(d + k)) = d/(2r) for d = k; GPT-3 d = 12288, r = 4: 1,536× (not 6,144×)",
    derivation="lora_counts.md",
    implements=lora_reduction,
    tol=0.0,
)
def _check_reduction() -> Outcome:
    cases = [(512, 8), (4096, 8), (12288, 4), (768, 16)]
    got = [lora_reduction(d, d, r) for d, r in cases]
    err = max(abs(float(g - Fraction(d, 2 * r))) for g, (d, r) in zip(got, cases))
    err += abs(float(lora_reduction(12288, 12288, 4)) - 1536.0)
    return Outcome(
        error=err,
        arrays={"d_r": np.array(cases), "reduction": np.array([float(g) for g in got])},
    )


@equation(
    "counts.multitask",
    what="n·d·k / (d·k + n·r·(d + k)); 3 tasks, d = k = 512, r = 8: 96/35 ≈ 2.74× (not 24×)",
    derivation="lora_counts.md",
    implements=multitask_reduction,
    tol=0.0,
)
def _check_multitask() -> Outcome:
    got = multitask_reduction(3, 512, 512, 8)
    # by hand: 3·262144 / (262144 + 3·8·1024) = 786432 / 286720 = 96/35
    err = abs(float(got - Fraction(96, 35)))
    return Outcome(error=err, arrays={"reduction": np.array(float(got))})


@equation(
    "counts.vera",
    what="VeRA trains d_out + r per matrix (b and d); d = k = 4096, r = 8: 4,104 (not 8,192)",
    derivation="lora_counts.md",
    implements=vera_params,
    tol=0.0,
)
def _check_vera() -> Outcome:
    got = vera_params(4096, 8)
    return Outcome(error=float(abs(got - 4104)), arrays={"vera_params": np.array(got)})


@equation(
    "counts.paper_formulas",
    what="AdapterH L̂(2dr + r + d) + 2L̂_LN·d and LoRA 2L̂dr reproduce GPT-3's Table 4/5 sizes",
    derivation="lora_counts.md",
    implements=adapter_params,
    tol=0.0,
)
def _check_paper() -> Outcome:
    d = 12288  # GPT-3 175B d_model; 96 layers
    published = {  # millions, as printed in Tables 4 and 5
        "AdapterH r=1": (adapter_params(192, d, 1), 7.1),
        "AdapterH r=8": (adapter_params(192, d, 8), 40.1),
        "LoRA q,v r=1": (paper_lora_params(192, d, 1), 4.7),
        "LoRA q,v r=8": (paper_lora_params(192, d, 8), 37.7),
    }
    err = max(abs(round(n / 1e6, 1) - p) for n, p in published.values())
    budgets = {paper_lora_params(96 * t, d, r) for t, r in ((1, 8), (2, 4), (4, 2))}
    err += len(budgets) - 1  # Table 5: every configuration has the same 18.9M budget
    return Outcome(
        error=float(err),
        arrays={"counts": np.array([n for n, _ in published.values()], dtype=np.int64)},
    )
