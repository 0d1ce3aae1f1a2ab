"""Bottleneck adapters: identity init, gradients, placement, counts, bad input; unified table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd.gradcheck import rel_error
from minipeft.autograd.tensor import Tensor, no_grad
from minipeft.models.bert import BertConfig, BertModel
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.peft.adapters import (
    AdaptedLayer,
    BottleneckAdapter,
    adapter,
    adapter_grads,
    adapter_targets,
    add_adapters,
)
from minipeft.peft.counts import adapter_params


def gpt2(seed: int = 0) -> GPT2:
    backend.seed(seed)
    return GPT2(GPT2Config(vocab_size=40, n_positions=16, n_embd=12, n_layer=2, n_head=3)).eval()


def bert(seed: int = 0) -> BertModel:
    backend.seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=20, max_position_embeddings=16)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False).eval()


IDS = np.array([[1, 4, 9, 2], [3, 3, 7, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])


def run(model):
    with no_grad():
        if isinstance(model, GPT2):
            return model(IDS).data.copy()
        return model(IDS, MASK).data.copy()


@pytest.mark.parametrize("build", [gpt2, bert])
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_zero_init_is_exactly_the_pretrained_model(build, kind):
    model = build()
    before = run(model)
    add_adapters(model, kind, 4)
    np.testing.assert_array_equal(run(model), before)


@pytest.mark.parametrize("build", [gpt2, bert])
def test_houlsby_init_is_near_identity_not_identity(build):
    model = build()
    before = run(model)
    add_adapters(model, "houlsby", 4, init="houlsby")
    diff = np.abs(run(model) - before).max()
    assert 0 < diff < 0.1 * np.abs(before).max()


def test_placement_names():
    assert adapter_targets(gpt2(), "houlsby") == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]  # fmt: skip
    assert adapter_targets(bert(), "pfeiffer") == [
        "encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]  # fmt: skip
    model = bert()
    add_adapters(model, "houlsby", 2)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    assert wrapped == adapter_targets(bert(), "houlsby")


@given(r=st.integers(1, 12), ln=st.booleans(), kind=st.sampled_from(["houlsby", "pfeiffer"]))
@settings(max_examples=10)
def test_count_matches_the_lora_paper_formula(r, ln, kind):
    per_layer = 2 if kind == "houlsby" else 1
    for build in (gpt2, bert):
        got = add_adapters(build(), kind, r, train_layernorm=ln)
        # GPT-2: ln_1, ln_2 per block; BERT: attention and output LayerNorms per layer
        assert got == adapter_params(per_layer * 2, 12, r, 2 * 2 if ln else 0)


def test_only_adapters_get_gradients_and_frozen_weights_get_none():
    model = gpt2()
    add_adapters(model, "houlsby", 3, init="houlsby")
    model.loss(IDS).backward()
    for name, p in model.named_parameters():
        if ".adapter." in name:
            assert p.grad is not None and np.abs(p.grad).max() > 0, name
        else:
            assert p.grad is None, name


@given(n=st.integers(1, 5), c=st.integers(2, 7), r=st.integers(1, 7),
       act=st.sampled_from(["relu", "gelu"]), seed=st.integers(0, 10_000))  # fmt: skip
@settings(max_examples=25)
def test_closed_form_gradients_equal_autograd(n, c, r, act, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in ((n, c), (r, c), (r,), (c, r), (c,))]
    g = rng.standard_normal((n, c))
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    adapter(*ts, act=act).backward(g)
    closed = adapter_grads(*arrays, g, act=act)
    for name, t in zip(("h", "w_down", "b_down", "w_up", "b_up"), ts):
        assert rel_error(closed[name], t.grad, atol=1e-10) < 1e-9, name


def test_zero_up_projection_blocks_the_down_gradient_at_step_zero():
    # with W_up = 0 nothing flows back into the bottleneck (D = (G·W_up) ⊙ f'(Z) = 0)
    a = BottleneckAdapter(6, 2)
    h = Tensor(np.random.default_rng(0).standard_normal((3, 6)).astype(a.down_weight.dtype))
    a(h).sum().backward()
    assert not np.any(a.down_weight.grad)
    assert np.any(a.up_weight.grad)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [({"bottleneck": 13}, ValueError, "bottleneck: expected at most the hidden size 12"),
     ({"bottleneck": 0}, ValueError, "bottleneck"),
     ({"kind": "lin"}, ValueError, "kind"),
     ({"act": "tanh"}, ValueError, "act"),
     ({"init": "ones"}, ValueError, "init")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs, exc, match):
    args = {"kind": "houlsby", "bottleneck": 4} | kwargs
    model = gpt2()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(exc, match=match):
        add_adapters(model, **args)
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}  # untouched


def test_twice_and_wrong_model_are_errors():
    model = gpt2()
    add_adapters(model, "pfeiffer", 2)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_adapters(model, "pfeiffer", 2)
    with pytest.raises(TypeError, match="GPT2 or BertModel"):
        add_adapters(BottleneckAdapter(4, 2), "houlsby", 2)


def test_unified_table_counts_merge_and_rows():
    from minipeft.peft.unified import default_methods, unified_table

    methods = {m.name.split()[0]: m for m in default_methods()}
    chosen = [methods[k] for k in ("LoRA", "Houlsby", "prompt", "BitFit")]
    cfg = GPT2Config(vocab_size=40, n_positions=40, n_embd=12, n_layer=2, n_head=3,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    rows = {r.method: r for r in unified_table(chosen, gpt2_config=cfg, seq_len=8, repeats=1)}
    lora, merged = rows["LoRA r=8 (q, v)"], rows["LoRA r=8 (q, v), merged"]
    assert lora.trainable == 6 * 2 * 8 * (384 + 384) and lora.mergeable and merged.mergeable
    assert rows["Houlsby adapters r=8"].trainable == adapter_params(12, 384, 8)
    assert not rows["Houlsby adapters r=8"].mergeable
    assert rows["prompt tuning P=20"].trainable == 20 * 384
    assert not rows["prompt tuning P=20"].mergeable and rows["BitFit"].mergeable
    assert all(r.latency_ratio > 0 for r in rows.values())
