"""GPT-2: config policy, HF names/layouts, checkpoint files, forward/loss/gradients, bad input.

Peer comparisons against transformers' ``GPT2LMHeadModel`` skip cleanly without torch or
transformers. Tolerances: float32 logits agree to atol 2e-5 / rtol 1e-4 (the two sides
sum in different orders; measured: max |Δ| ≈ 9e-7 for logits up to |2.3|); float64 runs
agree to rtol 1e-10 (measured ≈ 1e-15), which leaves no room for a layout or formula
difference; float64 gradients agree with torch autograd to rtol 1e-8.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import minipeft
from minipeft.autograd import Tensor
from minipeft.models import GPT2, CheckpointError, GPT2Config
from minipeft.models import io as mio
from minipeft.nn.conv1d import Conv1D, conv1d

TINY = dict(
    vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
)

# The tensor names (and Conv1D (in, out) shapes) that transformers 5.x writes into
# model.safetensors for GPT2LMHeadModel(vocab 61, n_positions 24, n_embd 16, n_layer 2):
# no lm_head.weight (tied), no attn.bias buffers.
HF_NAMES = {"transformer.wte.weight": (61, 16), "transformer.wpe.weight": (24, 16),
            "transformer.ln_f.weight": (16,), "transformer.ln_f.bias": (16,)}  # fmt: skip
for _i in range(2):
    HF_NAMES.update({
        f"transformer.h.{_i}.ln_1.weight": (16,), f"transformer.h.{_i}.ln_1.bias": (16,),
        f"transformer.h.{_i}.attn.c_attn.weight": (16, 48),
        f"transformer.h.{_i}.attn.c_attn.bias": (48,),
        f"transformer.h.{_i}.attn.c_proj.weight": (16, 16),
        f"transformer.h.{_i}.attn.c_proj.bias": (16,),
        f"transformer.h.{_i}.ln_2.weight": (16,), f"transformer.h.{_i}.ln_2.bias": (16,),
        f"transformer.h.{_i}.mlp.c_fc.weight": (16, 64), f"transformer.h.{_i}.mlp.c_fc.bias": (64,),
        f"transformer.h.{_i}.mlp.c_proj.weight": (64, 16),
        f"transformer.h.{_i}.mlp.c_proj.bias": (16,),
    })  # fmt: skip


def tiny_model(seed: int = 0, dtype: str = "float32", **over) -> GPT2:
    """A tiny GPT-2 with every parameter random (biases and LayerNorm affine too), eval mode."""
    minipeft.seed(seed)
    with minipeft.dtype_policy(dtype):
        model = GPT2(GPT2Config(**{**TINY, **over}))
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f.weight" in name:
            p.data[...] = 1 + 0.2 * rng.standard_normal(p.shape)
        else:
            p.data[...] = 0.15 * rng.standard_normal(p.shape)
    return model.eval()


def ids_batch(b: int = 2, t: int = 7, seed: int = 0, vocab: int = 61) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t))


# ---------------------------------------------------------------------------- config
# What transformers 5.23 writes as config.json for GPT2LMHeadModel(GPT2Config(...)).
HF_CONFIG_JSON = {
    "activation_function": "gelu_new", "add_cross_attention": False,
    "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 8, "n_head": 2,
    "n_inner": None, "n_layer": 2, "n_positions": 16, "pad_token_id": None,
    "reorder_and_upcast_attn": False, "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "tie_word_embeddings": True, "transformers_version": "5.23.0", "use_cache": True,
    "vocab_size": 50,
}  # fmt: skip
# The Hub's openai-community/gpt2 config.json (legacy keys n_ctx, task_specific_params).
HUB_GPT2_JSON = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
    "n_head": 12, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
    "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}  # fmt: skip


def test_config_defaults_are_gpt2_small():
    c = GPT2Config()
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (
        50257, 1024, 768, 12, 12,
    )  # fmt: skip
    assert c.inner_dim == 3072 and c.head_dim == 64 and c.activation_function == "gelu_new"
    assert c.layer_norm_epsilon == 1e-5 and c.initializer_range == 0.02


def test_config_reads_transformers_and_hub_files():
    c = GPT2Config.from_dict(HF_CONFIG_JSON)
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (50, 16, 8, 2, 2)
    assert GPT2Config.from_dict(HUB_GPT2_JSON) == GPT2Config()
    # what we write reads back, and transformers' own keys are all present
    assert GPT2Config.from_dict(c.to_dict()) == c
    assert c.to_dict()["model_type"] == "gpt2"


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"rotary_dim": 64}, r"unknown key\(s\) \['rotary_dim'\]"),
        ({"n_embed": 8}, r"unknown key\(s\) \['n_embed'\]"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"model_type": "gptj"}, "model_type='gptj'"),
        ({"pruned_heads": {"0": [1]}}, "pruned_heads"),
    ],
)
def test_config_rejects_keys_that_change_the_network(extra, match):
    with pytest.raises(CheckpointError, match=match):
        GPT2Config.from_dict({**HF_CONFIG_JSON, **extra})


@pytest.mark.parametrize(
    "over, match",
    [
        ({"n_embd": 10, "n_head": 4}, "n_embd: must be divisible by n_head=4"),
        ({"n_layer": 0}, "n_layer: expected a positive integer"),
        ({"vocab_size": 3.5}, "vocab_size: expected a positive integer"),
        ({"activation_function": "gelu"}, "activation_function: expected one of"),
        ({"attn_pdrop": 1.5}, "attn_pdrop: expected a probability"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon: expected a positive number"),
        ({"n_inner": -1}, "n_inner: expected a positive integer"),
    ],
)
def test_config_validates_values(over, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**{**TINY, **over})


# ---------------------------------------------------------------------------- structure
def test_state_dict_matches_transformers_names_and_layouts():
    model = GPT2(GPT2Config(**TINY))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == HF_NAMES
    assert list(model.state_dict())[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert isinstance(model.get_submodule("transformer.h.1.attn.c_attn"), Conv1D)
    assert model.lm_head_weight is model.transformer.wte.weight  # tied


def test_untied_head_has_its_own_weight():
    model = GPT2(GPT2Config(**TINY, tie_word_embeddings=False))
    sd = model.state_dict()
    assert sd["lm_head.weight"].shape == (61, 16)
    assert model.lm_head_weight is not model.transformer.wte.weight


def test_initialization_follows_gpt2():
    minipeft.seed(3)
    cfg = GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=8, n_head=4)
    model = GPT2(cfg)
    sd = model.state_dict()
    resid_std = 0.02 / np.sqrt(2 * 8)  # GPT-2 paper: residual projections scaled by 1/√(2L)
    for name, std in [
        ("transformer.wte.weight", 0.02),
        ("transformer.wpe.weight", 0.02),
        ("transformer.h.0.attn.c_attn.weight", 0.02),
        ("transformer.h.3.mlp.c_fc.weight", 0.02),
        ("transformer.h.0.attn.c_proj.weight", resid_std),
        ("transformer.h.7.mlp.c_proj.weight", resid_std),
    ]:
        assert abs(sd[name].std() / std - 1) < 0.05, name
        assert abs(sd[name].mean()) < 0.1 * std, name
    for name, arr in sd.items():
        if name.endswith(".bias"):
            assert not arr.any(), name
        if ".ln_" in name and name.endswith(".weight"):
            assert (arr == 1).all(), name
    assert sd["transformer.wte.weight"].dtype == np.float32


def test_conv1d_is_x_times_w_plus_b():
    minipeft.seed(0)
    layer = Conv1D(3, 5)
    assert layer.weight.shape == (3, 5) and layer.bias.shape == (5,)
    layer.bias.data[...] = np.arange(5)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    want = np.einsum("bti,io->bto", x, layer.weight.data) + np.arange(5)
    np.testing.assert_allclose(layer(Tensor(x)).data, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected last dimension 3"):
        layer(Tensor(np.ones((2, 4))))


def test_conv1d_frozen_weight_gets_no_gradient_and_bad_shapes():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    w, b = Tensor(rng.standard_normal((3, 4))), Tensor(np.zeros(4), requires_grad=True)
    y = conv1d(x, w, b)
    assert y.shape == (2, 4)
    y.backward(np.ones((2, 4)))
    assert w.grad is None
    np.testing.assert_allclose(x.grad, np.ones((2, 4)) @ w.data.T, rtol=1e-12)  # X̄ = Ḡ·Wᵀ
    np.testing.assert_array_equal(b.grad, [2.0] * 4)  # b̄ = Σₙ Ḡₙ
    with pytest.raises(ValueError, match="bias: expected shape"):
        conv1d(x, w, Tensor(np.zeros(3)))
    with pytest.raises(TypeError, match="share a dtype"):
        conv1d(x, w.astype(np.float32), b)


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(1)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    header = mio.read_safetensors_header(tmp_path / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    assert {k: tuple(v["shape"]) for k, v in header.items()} == HF_NAMES
    back = GPT2.from_pretrained(tmp_path)
    assert not back.training
    ids = ids_batch()
    np.testing.assert_array_equal(back(ids).data, model(ids).data)
    back64 = GPT2.from_pretrained(tmp_path, dtype="float64")
    assert back64.transformer.wte.weight.dtype == np.float64


def _write_variant(src, dst, rename=None, drop=(), add=None, config_update=None):
    tensors = mio.load_safetensors(src / "model.safetensors")
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    dst.mkdir()
    mio.save_safetensors_atomic(dst / "model.safetensors", tensors, {"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_accepts_bare_names_legacy_buffers_and_a_tied_head_copy(tmp_path):
    model = tiny_model(2)
    src = model.save_pretrained(tmp_path / "src")
    wte = model.transformer.wte.weight.data
    legacy = {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 24, 24), np.float32)) for i in range(2)}
    legacy["lm_head.weight"] = wte.copy()
    d = _write_variant(
        src, tmp_path / "bare", rename=lambda k: k.removeprefix("transformer."), add=legacy
    )
    ids = ids_batch()
    np.testing.assert_array_equal(GPT2.from_pretrained(d)(ids).data, model(ids).data)
    bad = _write_variant(src, tmp_path / "head", add={"lm_head.weight": wte + 1})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from transformer\.wte"):
        GPT2.from_pretrained(bad)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    src = tiny_model(0).save_pretrained(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        GPT2.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"model\.safetensors: no such file.*never unpickles"
    ):
        GPT2.from_pretrained(tmp_path / "empty")
    d = _write_variant(src, tmp_path / "noconf")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: no such JSON file"):
        GPT2.from_pretrained(d)
    d = _write_variant(src, tmp_path / "missing", drop={"transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['transformer\.h\.1\.mlp\.c_fc"):
        GPT2.from_pretrained(d)
    d = _write_variant(
        src, tmp_path / "shape", add={"transformer.h.0.attn.c_attn.weight": np.zeros((48, 16))}
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: mis-shaped.*c_attn\.weight: expected shape \(16, 48\), "
        r"got \(48, 16\)",
    ):
        GPT2.from_pretrained(d)
    d = _write_variant(src, tmp_path / "extra", add={"transformer.h.0.adapter": np.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        GPT2.from_pretrained(d)
    d = _write_variant(src, tmp_path / "conf", config_update={"rotary_dim": 4})
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key\(s\) \['rotary_dim'\]"):
        GPT2.from_pretrained(d)


# ---------------------------------------------------------------------------- forward
def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    with pytest.raises(TypeError, match="input_ids: expected integer token ids, got dtype float"):
        model(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(batch, sequence\)"):
        model(np.arange(3))
    with pytest.raises(ValueError, match="sequence length 25 exceeds n_positions=24"):
        model(np.zeros((1, 25), dtype=np.int64))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 61\)"):
        model(np.array([[1, 61]]))
    with pytest.raises(ValueError, match="give exactly one"):
        model()
    with pytest.raises(ValueError, match="give exactly one"):
        model(np.array([[1]]), inputs_embeds=Tensor(np.zeros((1, 1, 16), np.float32)))
    with pytest.raises(ValueError, match=r"inputs_embeds: expected shape \(batch, sequence, 16\)"):
        model(inputs_embeds=Tensor(np.zeros((1, 2, 8), np.float32)))
    with pytest.raises(TypeError, match="inputs_embeds: expected dtype float32"):
        model(inputs_embeds=Tensor(np.zeros((1, 2, 16))))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 3\)"):
        model(np.array([[1, 2, 3]]), attention_mask=np.ones((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(np.array([[1, 2, 3]]), attention_mask=np.array([[1, 2, 1]]))
    with pytest.raises(TypeError, match="labels: expected integer"):
        model.loss(np.array([[1, 2, 3]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"labels: expected shape \(1, 3\)"):
        model.loss(np.array([[1, 2, 3]]), np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"past_prefix: expected 2 \(k, v\) pairs"):
        model(np.array([[1, 2]]), past_prefix=[])
    with pytest.raises(ValueError, match="sequence length 22 \\+ prefix length 3 exceeds"):
        kv = Tensor(np.zeros((1, 4, 3, 4), np.float32))
        model(np.zeros((1, 22), dtype=np.int64), past_prefix=[(kv, kv)] * 2)


def test_inputs_embeds_equals_input_ids():
    model = tiny_model()
    ids = ids_batch()
    emb = Tensor(model.transformer.wte.weight.data[ids])
    np.testing.assert_array_equal(model(inputs_embeds=emb).data, model(ids).data)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    ids = ids_batch(1, 8)
    changed = ids.copy()
    changed[0, 5:] = (changed[0, 5:] + 7) % 61
    a, b = model(ids).data, model(changed).data
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_padding_mask_right_and_left():
    model = tiny_model()
    full = ids_batch(1, 5, seed=4)
    ref = model(full).data[0]  # (5, V)
    # right padding: real tokens first; positions unchanged
    right = np.concatenate([full, [[3, 9]]], axis=1)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0]])
    out = model(right, attention_mask=mask).data[0]
    np.testing.assert_allclose(out[:5], ref, rtol=1e-5, atol=1e-6)
    assert np.isfinite(out).all()
    # left padding: pads first; give positions explicitly so real tokens start at 0
    left = np.concatenate([[[3, 9]], full], axis=1)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]])
    pos = np.array([[0, 0, 0, 1, 2, 3, 4]])
    out = model(left, attention_mask=mask, position_ids=pos).data[0]
    np.testing.assert_allclose(out[2:], ref, rtol=1e-5, atol=1e-6)
    assert np.isfinite(out).all()
    # and the padded tokens' values do not matter
    other = left.copy()
    other[0, :2] = [50, 51]
    np.testing.assert_array_equal(
        model(other, attention_mask=mask, position_ids=pos).data[0, 2:], out[2:]
    )


def test_prefix_equals_cached_keys_and_values_of_a_prompt():
    """Prefix k/v taken from a real prompt reproduce the logits of prompt + sequence."""
    model = tiny_model(5)
    prompt, seq = ids_batch(2, 4, seed=1), ids_batch(2, 5, seed=2)
    # k, v of the prompt at each layer, computed by hand from the modules' parts
    tr, h, d = model.transformer, 4, 4
    x = tr.wte(prompt) + tr.wpe(np.arange(4))
    prefix = []
    for block in tr.h:
        qkv = block.attn.c_attn(block.ln_1(x)).data.reshape(2, 4, 3, h, d)
        prefix.append((Tensor(qkv[:, :, 1].transpose(0, 2, 1, 3)),
                       Tensor(qkv[:, :, 2].transpose(0, 2, 1, 3))))  # fmt: skip
        x = block(x)
    want = model(np.concatenate([prompt, seq], axis=1)).data[:, 4:]
    got = model(seq, past_prefix=prefix).data
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the prefix receives gradients (prefix tuning trains them)
    trainable = [(Tensor(k.data, requires_grad=True), Tensor(v.data, requires_grad=True))
                 for k, v in prefix]  # fmt: skip
    model.requires_grad_(False)
    model.loss(seq, past_prefix=trainable).backward()
    assert all(k.grad is not None and np.abs(k.grad).sum() > 0 for k, _ in trainable)
    assert model.transformer.wte.weight.grad is None


def test_shared_prefix_broadcasts_over_the_batch_and_sums_its_gradient():
    model = tiny_model(6, dtype="float64")
    model.requires_grad_(False)
    rng = np.random.default_rng(3)
    shared = [tuple(rng.standard_normal((1, 4, 2, 4)) for _ in range(2)) for _ in range(2)]
    ids = ids_batch(3, 5, seed=4)
    one = [(Tensor(k, requires_grad=True), Tensor(v, requires_grad=True)) for k, v in shared]
    tiled = [
        (
            Tensor(np.repeat(k, 3, 0), requires_grad=True),
            Tensor(np.repeat(v, 3, 0), requires_grad=True),
        )
        for k, v in shared
    ]
    a, b = model.loss(ids, past_prefix=one), model.loss(ids, past_prefix=tiled)
    np.testing.assert_allclose(a.item(), b.item(), rtol=1e-13)
    a.backward()
    b.backward()
    for (k1, v1), (k3, v3) in zip(one, tiled):
        np.testing.assert_allclose(k1.grad, k3.grad.sum(0, keepdims=True), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(v1.grad, v3.grad.sum(0, keepdims=True), rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match=r"past_prefix\[0\]\.k: expected shape \(3 or 1, 4"):
        bad = Tensor(np.zeros((2, 4, 2, 4)))
        model(ids, past_prefix=[(bad, bad)] * 2)
    with pytest.raises(TypeError, match="expected dtype float64"):
        bad = Tensor(np.zeros((1, 4, 2, 4), np.float32))
        model(ids, past_prefix=[(bad, bad)] * 2)


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = tiny_model()
    ids = ids_batch(2, 6)
    labels = ids.copy()
    labels[0, 3] = -100
    logits = model(ids).data.astype(np.float64)
    # reference: explicit log-softmax, position t predicts labels[t + 1]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [
        -logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] >= 0
    ]
    np.testing.assert_allclose(model.loss(ids, labels).item(), np.mean(terms), rtol=1e-5)
    assert len(terms) == 9


def test_dropout_only_in_training_mode():
    model = tiny_model()
    ids = ids_batch()
    a = model(ids).data
    np.testing.assert_array_equal(model(ids).data, a)
    model.train()
    assert np.abs(model(ids).data - a).max() > 1e-4
    model.eval()
    np.testing.assert_array_equal(model(ids).data, a)


def test_gradients_match_central_differences_float64():
    model = tiny_model(7, dtype="float64")
    ids = ids_batch(2, 6, seed=3)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    labels = np.where(mask == 1, ids, -100)
    names = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.h.0.ln_2.weight",
        "transformer.ln_f.bias",
    ]
    params = dict(model.named_parameters())
    model.zero_grad()
    model.loss(ids, labels, attention_mask=mask).backward()
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name in names:
        p = params[name]
        v = rng.standard_normal(p.shape)
        orig = p.data.copy()
        p.data[...] = orig + eps * v
        up = model.loss(ids, labels, attention_mask=mask).item()
        p.data[...] = orig - eps * v
        down = model.loss(ids, labels, attention_mask=mask).item()
        p.data[...] = orig
        numeric = (up - down) / (2 * eps)  # ⟨∇L, v⟩ by central differences
        analytic = float((p.grad * v).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), name


def test_frozen_model_gets_no_gradient_buffers():
    model = tiny_model()
    model.requires_grad_(False)
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(True)
    model.loss(ids_batch()).backward()
    got = [n for n, p in model.named_parameters() if p.grad is not None]
    assert got == ["transformer.h.1.mlp.c_fc.weight"]


# ---------------------------------------------------------------------------- CLI
def test_logits_cli_writes_float32_npy(tmp_path, capsys):
    from minipeft.__main__ import main

    model = tiny_model(3)
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out" / "logits.npy"
    assert (
        main(["logits", "--model", str(tmp_path / "m"), "--ids", "5, 7,11", "--out", str(out)]) == 0
    )
    got = np.load(out, allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (3, 61)
    np.testing.assert_array_equal(got, model(np.array([[5, 7, 11]])).data[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["logits.npy"]
    capsys.readouterr()
    for ids, msg in [("1,x", "--ids: expected comma-separated"), ("1,,2", "--ids"),
                     ("1,99", "values must lie in")]:  # fmt: skip
        assert (
            main(["logits", "--model", str(tmp_path / "m"), "--ids", ids, "--out", str(out)]) == 2
        )
        assert msg in capsys.readouterr().err
    assert main(["logits", "--model", str(tmp_path / "x"), "--ids", "1", "--out", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out, allow_pickle=False), got)  # untouched


# ---------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch", reason="cross-check against PyTorch needs torch")
    transformers = pytest.importorskip(
        "transformers", reason="cross-check against HF GPT2LMHeadModel needs transformers"
    )
    transformers.logging.set_verbosity_error()
    return torch, transformers


def hf_random_model(hf, seed=0, **over):
    """transformers' GPT2LMHeadModel with every parameter random, in eval mode."""
    torch, transformers = hf
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **over}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name != "lm_head.weight":  # tied: the same tensor as wte
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def test_transformers_checkpoint_loads_with_equal_logits_and_loss(hf, tmp_path):
    torch, _ = hf
    ref = hf_random_model(hf, 1)
    ref.save_pretrained(tmp_path)
    ids = ids_batch(3, 9, seed=5)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    model = GPT2.from_pretrained(tmp_path)
    np.testing.assert_allclose(model(ids).data, out.logits.numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(model.loss(ids).item(), out.loss.item(), rtol=1e-5)
    # float64 on both sides: agreement to rounding, no room for a formula difference
    model64 = GPT2.from_pretrained(tmp_path, dtype="float64")
    ref64 = ref.double()
    with torch.no_grad():
        out64 = ref64(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    np.testing.assert_allclose(model64(ids).data, out64.logits.numpy(), rtol=1e-10, atol=1e-12)
    # (HF's loss casts logits to float32, so the float64 reference is torch's cross-entropy)
    lg = out64.logits[:, :-1].reshape(-1, 61)
    want = torch.nn.functional.cross_entropy(lg, torch.from_numpy(ids[:, 1:]).reshape(-1))
    np.testing.assert_allclose(model64.loss(ids).item(), want.item(), rtol=1e-12)


def test_untied_transformers_checkpoint_loads(hf, tmp_path):
    torch, _ = hf
    ref = hf_random_model(hf, 5, tie_word_embeddings=False)
    with torch.no_grad():
        ref.lm_head.weight.copy_(0.15 * torch.randn_like(ref.lm_head.weight))
    ref.save_pretrained(tmp_path)
    names = mio.read_safetensors_header(tmp_path / "model.safetensors")
    assert "lm_head.weight" in names  # untied: transformers writes the head
    model = GPT2.from_pretrained(tmp_path)
    np.testing.assert_array_equal(model.lm_head_weight.data, ref.lm_head.weight.detach().numpy())
    ids = ids_batch(2, 6, seed=11)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model(ids).data, want, rtol=1e-4, atol=2e-5)


def test_minipeft_checkpoint_loads_in_transformers(hf, tmp_path):
    torch, transformers = hf
    for tied in (True, False):
        model = tiny_model(4, tie_word_embeddings=tied)
        d = model.save_pretrained(tmp_path / str(tied))
        ref = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
        sd = ref.state_dict()
        for name, arr in model.state_dict().items():
            np.testing.assert_array_equal(sd[name].numpy(), arr)
        ids = ids_batch(2, 11, seed=6)
        with torch.no_grad():
            logits = ref(torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_allclose(model(ids).data, logits, rtol=1e-4, atol=2e-5)


def test_gradients_match_torch_autograd(hf, tmp_path):
    torch, _ = hf
    ref = hf_random_model(hf, 2).double()
    ref.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path, dtype="float64")
    ids = ids_batch(2, 8, seed=7)
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
    labels = np.where(mask == 1, ids, -100)
    logits = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    # torch's float64 cross-entropy (HF's own loss would cast the logits to float32)
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 61), torch.from_numpy(labels[:, 1:]).reshape(-1)
    ).backward()
    model.loss(ids, labels, attention_mask=mask).backward()
    hf_params = dict(ref.named_parameters())
    ours = dict(model.named_parameters())
    for name in [
        "transformer.wte.weight",  # embedding + tied head: both paths accumulate
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.ln_1.weight",
        "transformer.ln_f.bias",
    ]:
        np.testing.assert_allclose(
            ours[name].grad, hf_params[name].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name
        )


def test_padding_and_embeds_match_transformers(hf, tmp_path):
    torch, _ = hf
    ref = hf_random_model(hf, 3)
    ref.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path)
    ids = ids_batch(2, 7, seed=8)
    for mask in (np.array([[1] * 7, [1] * 4 + [0] * 3]), np.array([[1] * 7, [0] * 3 + [1] * 4])):
        with torch.no_grad():
            want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        got = model(ids, attention_mask=mask).data
        valid = mask.astype(bool)
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=2e-5)
    emb = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32) * 0.3
    with torch.no_grad():
        want = ref(inputs_embeds=torch.from_numpy(emb)).logits.numpy()
    np.testing.assert_allclose(model(inputs_embeds=Tensor(emb)).data, want, rtol=1e-4, atol=2e-5)


def test_prefix_matches_transformers_past_key_values(hf, tmp_path):
    torch, transformers = hf
    ref = hf_random_model(hf, 4)
    ref.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path)
    rng = np.random.default_rng(9)
    prefix = [
        tuple(rng.standard_normal((2, 4, 3, 4)).astype(np.float32) for _ in range(2))
        for _ in range(2)
    ]
    ids = ids_batch(2, 5, seed=10)
    cache = transformers.DynamicCache()
    for i, (k, v) in enumerate(prefix):
        cache.update(torch.from_numpy(k), torch.from_numpy(v), i)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), past_key_values=cache).logits.numpy()
    got = model(ids, past_prefix=[(Tensor(k), Tensor(v)) for k, v in prefix]).data
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
