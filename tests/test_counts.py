"""Parameter counts against hand-derived closed forms and the LoRA paper's published sizes."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.peft.counts import (
    adapter_params,
    bitfit_params,
    count_params,
    full_params,
    lecture_errata5,
    lora_model_params,
    lora_params,
    lora_reduction,
    multitask_reduction,
    paper_lora_params,
    prefix_embedding_params,
    prefix_layer_params,
    vera_params,
)

dims = st.integers(1, 50_000)


@given(dims, dims, st.integers(1, 512))
def test_lora_counts_closed_forms(d, k, r):
    assert full_params(d, k) == d * k
    assert lora_params(d, k, r) == d * r + r * k
    assert lora_reduction(d, k, r) == Fraction(d * k, r * (d + k))
    assert vera_params(d, r) == d + r


@given(st.integers(1, 50_000), st.integers(1, 512))
def test_square_reduction_is_d_over_2r(d, r):
    assert lora_reduction(d, d, r) == Fraction(d, 2 * r)


def test_errata5_numbers():
    assert lora_reduction(12288, 12288, 4) == 1536  # the lecture says 6,144
    assert lora_reduction(4096, 4096, 8) == 256  # the lecture is right here
    assert lora_reduction(512, 512, 8) == 32
    # 3 tasks: 3·512² / (512² + 3·8192) = 786432 / 286720 = 96/35 ≈ 2.74 (lecture: ≈ 24)
    assert multitask_reduction(3, 512, 512, 8) == Fraction(96, 35)
    rows = {r["claim"]: r for r in lecture_errata5()}
    assert not rows["GPT-3 d=k=12288, r=4 (3.1.2)"]["right"]
    assert rows["GPT-3 d=k=12288, r=4 (3.1.2)"]["computed"] == 1536
    assert not rows["3 tasks, d=k=512, r=8 (1.3)"]["right"]
    assert rows["LoRA, d=k=4096, r=8 (3.1.2)"]["right"]
    # VeRA (ERRATA 11): d_out + r = 4104 per matrix, not d + k = 8192
    assert rows["VeRA vs full, d=k=4096, r=8 (3.9.3)"]["computed"] == pytest.approx(4096**2 / 4104)


def test_paper_formulas_closed_forms():
    assert paper_lora_params(3, 10, 2) == 2 * 3 * 10 * 2
    assert adapter_params(4, 10, 2, n_layernorm=3) == 4 * (2 * 10 * 2 + 2 + 10) + 2 * 3 * 10
    assert prefix_embedding_params(10, 5, 2) == 70
    assert prefix_layer_params(4, 10, 5, 2) == 280
    # the paper's LoRA formula is the per-matrix r(d+k) summed over square matrices
    assert paper_lora_params(7, 64, 4) == 7 * lora_params(64, 64, 4)


def test_gpt3_published_sizes():
    """GPT-3 175B (d_model 12288, 96 layers), LoRA paper Tables 4 and 5."""
    # LoRA on Wq and Wv of all 96 layers (192 matrices): r = 1 → 4.7M, r = 8 → 37.7M
    assert round(paper_lora_params(192, 12288, 1) / 1e6, 1) == 4.7
    assert round(paper_lora_params(192, 12288, 8) / 1e6, 1) == 37.7
    # AdapterH: two adapter layers per block (192), r = 1 → 7.1M, r = 8 → 40.1M
    assert round(adapter_params(192, 12288, 1) / 1e6, 1) == 7.1
    assert round(adapter_params(192, 12288, 8) / 1e6, 1) == 40.1
    # Table 5: one type with r = 8, two with r = 4, four with r = 2 — the same budget
    budgets = {paper_lora_params(96 * t, 12288, r) for t, r in ((1, 8), (2, 4), (4, 2))}
    assert budgets == {18_874_368}


def test_model_level_counts():
    shapes = {
        "h.0.attn.c_attn.weight": (64, 192),  # GPT-2 Conv1D layout (in, out)
        "h.0.attn.c_attn.bias": (192,),
        "h.0.ln_1.weight": (64,),
        "h.0.ln_1.bias": (64,),
        "h.0.mlp.c_fc.weight": (64, 256),
        "h.0.mlp.c_fc.bias": (256,),
    }
    assert count_params(shapes) == 64 * 192 + 192 + 64 + 64 + 64 * 256 + 256
    assert bitfit_params(shapes) == 192 + 64 + 256
    assert lora_model_params(shapes, lambda n: "c_attn" in n, 8) == 8 * (64 + 192)


def test_bad_inputs():
    with pytest.raises(ValueError, match="r"):
        lora_params(4, 4, 0)
    with pytest.raises(ValueError, match="d_out"):
        full_params(-1, 3)
    with pytest.raises(ValueError, match="n_tasks"):
        multitask_reduction(0, 4, 4, 1)
    with pytest.raises(ValueError, match="d_in"):
        lora_params(4, 2.5, 1)
