"""Prompt tuning, prefix tuning, P-tuning v2 and PreLayer on GPT-2 and BERT."""

from __future__ import annotations

import numpy as np
import pytest

from minipeft import backend
from minipeft.autograd.tensor import Tensor, no_grad
from minipeft.models.bert import BertConfig, BertModel
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.peft.counts import prefix_embedding_params, prefix_layer_params
from minipeft.peft.prompts import (
    PrefixLayer,
    PrefixTuning,
    PromptedModel,
    PromptTuning,
    PTuningV2,
)
from minipeft.train import SentenceClassifier

L, C, H, NPOS = 2, 12, 3, 16


def gpt2(seed: int = 0) -> GPT2:
    backend.seed(seed)
    cfg = GPT2Config(vocab_size=40, n_positions=NPOS, n_embd=C, n_layer=L, n_head=H,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2(cfg).eval()


def bert(seed: int = 0) -> BertModel:
    backend.seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
                     intermediate_size=20, max_position_embeddings=NPOS)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False).eval()


IDS = np.array([[1, 4, 9, 2], [3, 3, 7, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
METHODS = [
    lambda m: PromptTuning(m, 3, std=0.5),
    lambda m: PrefixTuning(m, 3, reparam_hidden=5),
    lambda m: PTuningV2(m, 3, std=0.5),
    lambda m: PrefixLayer(m, 3, std=0.5),
]
NAMES = ["prompt", "prefix", "ptv2", "prelayer"]


def out(pm):
    with no_grad():
        return pm(IDS, MASK).data.copy()


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
@pytest.mark.parametrize("make", METHODS, ids=NAMES)
def test_outputs_cover_real_tokens_and_change_the_model(build, make):
    base = build()
    pm = PromptedModel(base, make(base))
    y = out(pm)
    assert y.shape[:2] == IDS.shape
    with no_grad():
        plain = (base(IDS) if isinstance(base, GPT2) else base(IDS, MASK)).data
    assert np.abs(y - plain).max() > 1e-4  # the virtual tokens are seen


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
@pytest.mark.parametrize("make", METHODS, ids=NAMES)
def test_only_the_method_trains_and_fold_keeps_outputs(build, make):
    base = build()
    method = make(base)
    pm = PromptedModel(base, method)
    y = pm(IDS, MASK)
    y.sum().backward()
    for name, p in pm.named_parameters():
        if name.startswith("base."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and np.abs(p.grad).max() > 0, name
    before = out(pm)
    pm.fold()
    np.testing.assert_allclose(out(pm), before, rtol=1e-5, atol=1e-6)
    if method.deep:  # folded: plain per-layer key/value prefixes
        assert sum(p.size for p in pm.prompt.parameters()) == 2 * L * 3 * C


def test_counts_match_the_lora_paper_formulas():
    base = bert()
    assert PromptTuning(base, 5).prompt.size == prefix_embedding_params(C, 5)
    assert PrefixLayer(base, 5).hidden.size == prefix_layer_params(L, C, 5)
    assert PTuningV2(base, 5).prefix.size == 2 * prefix_layer_params(L, C, 5)


def test_prompt_tuning_equals_a_hand_built_embedding_sequence():
    base = gpt2()
    pt = PromptTuning(base, 2, std=0.5)
    soft = pt.prompt.data
    emb = base.transformer.wte.weight.data[IDS]  # (B, T, C)
    x = np.concatenate([np.broadcast_to(soft, (2, 2, C)), emb], axis=1)
    with no_grad():
        want = base(inputs_embeds=Tensor(x.astype(soft.dtype))).data[:, 2:]
        got = PromptedModel(base, pt)(IDS).data
    np.testing.assert_array_equal(got, want)


def test_vocab_init_copies_embedding_rows_repeated():
    base = bert()
    pt = PromptTuning(base, 5, init="vocab", init_token_ids=[7, 3])
    table = base.embeddings.word_embeddings.weight.data
    np.testing.assert_array_equal(pt.prompt.data, table[[7, 3, 7, 3, 7]])


@pytest.mark.parametrize("make", METHODS, ids=NAMES)
def test_gpt2_stays_causal_with_virtual_tokens(make):
    base = gpt2()
    pm = PromptedModel(base, make(base))
    changed = IDS.copy()
    changed[:, 3] = 11
    with no_grad():
        a, b = pm(IDS).data, pm(changed).data
    np.testing.assert_array_equal(a[:, :3], b[:, :3])  # earlier tokens never see token 3
    assert np.abs(a[:, 3] - b[:, 3]).max() > 0


@pytest.mark.parametrize("make", METHODS, ids=NAMES)
def test_bert_padding_still_hidden_and_pooling_skips_virtual_tokens(make):
    base = bert()
    pm = PromptedModel(base, make(base))
    other = IDS.copy()
    other[1, 3] = 17  # a different token under the padding
    a, b = out(pm), PromptedModel.forward(pm, other, MASK).data
    np.testing.assert_allclose(a[1, :3], b[1, :3], rtol=1e-6, atol=1e-7)
    clf = SentenceClassifier(pm, C)
    with no_grad():
        logits = clf(IDS, MASK).data
    pooled = (a * MASK[..., None]).sum(1) / MASK.sum(1, keepdims=True)  # real tokens only
    want = pooled @ clf.head.weight.data.T + clf.head.bias.data
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_gpt2_loss_as_hf_peft():
    # prompt tuning: labels −100 on the virtual positions, so the last virtual position
    # predicts the first real token (HF PEFT's convention); a KV prefix predicts tokens 1…T−1
    base = gpt2()
    pt = PromptTuning(base, 2)
    emb = base.transformer.wte.weight.data[IDS]
    x = np.concatenate([np.broadcast_to(pt.prompt.data, (2, 2, C)), emb], axis=1)
    with no_grad():
        logits = base(inputs_embeds=Tensor(x)).data[:, 1:-1]  # positions P−1 … P+T−2
        loss = PromptedModel(base, pt).loss(IDS).data
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, IDS[:, :, None], -1).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    pv = PTuningV2(base, 2)
    with no_grad():
        logits = PromptedModel(base, pv)(IDS).data[:, :-1]
        loss = PromptedModel(base, pv).loss(IDS).data
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, IDS[:, 1:, None], -1).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("cls", [PromptTuning, PrefixTuning, PTuningV2, PrefixLayer])
@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
def test_bad_lengths_are_clear_errors(cls, build):
    base = build()
    with pytest.raises(ValueError, match="num_virtual_tokens: expected at least 1"):
        cls(base, 0)
    with pytest.raises(ValueError, match=f"context of n_positions={NPOS}"):
        cls(base, NPOS)
    with pytest.raises(TypeError, match="num_virtual_tokens"):
        cls(base, 2.0)


def test_prompt_plus_text_longer_than_the_context():
    base = gpt2()
    pm = PromptedModel(base, PromptTuning(base, NPOS - 2))
    with pytest.raises(ValueError, match="n_positions"):
        pm(IDS)  # 14 virtual + 4 real > 16 positions
    pm2 = PromptedModel(base, PTuningV2(base, NPOS - 2))
    with pytest.raises(ValueError, match="prefix length 14 exceeds n_positions"):
        pm2(IDS)


def test_other_bad_input():
    base = gpt2()
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(base, 2, init="vocab")
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(base, 2, init="vocab", init_token_ids=[99])
    with pytest.raises(ValueError, match="reparam_hidden"):
        PrefixTuning(base, 2, reparam_hidden=0)
    with pytest.raises(ValueError, match="other sizes"):
        PromptedModel(bert(), PromptTuning(base, 2))
    with pytest.raises(TypeError, match="GPT2 or BertModel"):
        PromptTuning(object(), 2)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_gpt2_logits_equal_hf_peft(kind, tmp_path):
    torch = pytest.importorskip("torch", reason="peer check against HF PEFT needs torch")
    transformers = pytest.importorskip("transformers", reason="peer check needs transformers")
    peft = pytest.importorskip("peft", reason="peer check against HF PEFT")
    ids = np.array([[1, 4, 9, 2], [3, 3, 7, 5]])
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])  # left padding in the second row
    with backend.dtype_policy("float64"):
        base = gpt2()
        base.save_pretrained(tmp_path)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
        if kind == "prefix":
            method = PTuningV2(base, 3, std=0.5)
            # HF PEFT's prefix embedding row p = [K_0[p], V_0[p], K_1[p], V_1[p], …]
            weight = method.prefix.data.transpose(2, 0, 1, 3).reshape(3, -1)
            cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        else:
            method = PromptTuning(base, 3, std=0.5)
            weight = method.prompt.data
            cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        with no_grad():
            ours = PromptedModel(base, method)(ids, mask).data
    hp = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        hp.prompt_encoder.default.embedding.weight.copy_(torch.from_numpy(weight))
        theirs = hp(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    theirs = theirs.logits.numpy()[:, -ids.shape[1] :]  # prompt tuning returns P + T rows
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-7, atol=1e-8)
