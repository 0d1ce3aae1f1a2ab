"""Checks for derivations/lora_serving.md: the mixed-adapter batch against the dense rule.

The expected value is computed row by row from the dense update of the row's adapter,
Δy_i = (s_a·B_a·A_a)·x_i — no grouping, no padding, no kernel — in float64.
"""

from __future__ import annotations

import numpy as np

from ...peft.serving import lora_mixed_delta_reference, stack_adapters
from ..registry import Outcome, equation


@equation(
    "lora.serving_mixed_batch",
    what="y_i = x_i·W₀ᵀ + s_{a(i)}·(x_i·A_{a(i)}ᵀ)·B_{a(i)}ᵀ, a(i) = −1: no adapter",
    derivation="lora_serving.md",
    implements=lora_mixed_delta_reference,
    tol=1e-12,
)
def _check_mixed_batch() -> Outcome:
    rng = np.random.default_rng(0)
    d_in, d_out = 6, 5
    ranks = (2, 4, 1)  # different ranks: the stack pads them to r_max = 4
    adapters = [
        (rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), 0.5 * (k + 1))
        for k, r in enumerate(ranks)
    ]
    x = rng.standard_normal((9, d_in))
    ids = np.array([2, -1, 0, 0, 1, -1, 2, 1, 0])
    stack = stack_adapters(adapters)
    dy = lora_mixed_delta_reference(x, stack, ids)
    want = np.zeros((9, d_out))
    for i, a in enumerate(ids):  # the dense rule, row by row
        if a >= 0:
            A, B, s = adapters[a]
            want[i] = (s * B @ A) @ x[i]
    err = float(np.max(np.abs(dy - want)) / np.max(np.abs(want)))
    return Outcome(
        error=err,
        arrays={
            "x": x,
            "adapter_ids": ids,
            "A_stacked": stack.A,
            "B_stacked": stack.B,
            "scaling": stack.scaling,
            "ranks": stack.ranks,
            "delta_y": dy,
        },
    )
