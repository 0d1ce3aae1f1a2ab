"""GPT-2 (language-model head) with Hugging Face's module names and weight layouts.

One readable model file in the spirit of nanoGPT, laid out so that a checkpoint written by
``transformers`` (``GPT2LMHeadModel.save_pretrained``) loads unchanged, and one written by
``GPT2.save_pretrained`` loads in ``transformers``:

    transformer.wte                 Embedding (vocab, C)        token embeddings
    transformer.wpe                 Embedding (n_positions, C)  learned positions
    transformer.h.{i}.ln_1          LayerNorm (C)
    transformer.h.{i}.attn.c_attn   Conv1D (C → 3C), weight (C, 3C): [q | k | v]
    transformer.h.{i}.attn.c_proj   Conv1D (C → C)
    transformer.h.{i}.ln_2          LayerNorm (C)
    transformer.h.{i}.mlp.c_fc      Conv1D (C → n_inner), n_inner = 4C by default
    transformer.h.{i}.mlp.c_proj    Conv1D (n_inner → C)
    transformer.ln_f                LayerNorm (C)
    lm_head                         tied to wte: logits = h·wteᵀ (no tensor of its own)

Pre-LayerNorm blocks (Radford et al., 2019, §2.3):

    h ← h + attn(ln_1(h))           attn = c_proj(softmax(QKᵀ/√d + causal mask)·V)
    h ← h + mlp(ln_2(h))            mlp  = c_proj(gelu_new(c_fc(·)))
    logits = ln_f(h)·Eᵀ             E = wte (weight tying)

Weight tying and files. ``transformers`` 5.x writes ``model.safetensors`` WITHOUT
``lm_head.weight`` when ``tie_word_embeddings`` is true (it re-ties on load), so
``GPT2.state_dict()`` has no ``lm_head.weight`` either and the two files list the same
tensors. On load, a tied checkpoint that does carry ``lm_head.weight`` (older writers)
is accepted only if it equals ``wte`` exactly; checkpoints of the bare ``GPT2Model``
(names without ``transformer.``, as on the Hub's ``gpt2``) are accepted, and the legacy
causal-mask buffers ``h.{i}.attn.bias`` / ``attn.masked_bias`` are dropped, as HF does.

Hooks used by PEFT methods later:
* ``inputs_embeds`` (B, T, C) instead of ``input_ids`` — prompt tuning prepends virtual
  token embeddings.
* ``past_prefix``: one (k, v) pair per layer, each (B or 1, H, P, d) — prefix tuning's
  virtual keys/values, placed before the sequence's own keys. As with HF's
  ``past_key_values``, the sequence's positions then start at P, and every query sees
  all P prefix keys (``scaled_dot_product_attention``'s Tk > Tq rule).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Tensor, input_array
from ..nn.attention import scaled_dot_product_attention
from ..nn.conv1d import Conv1D
from ..nn.layers import Dropout, Embedding, LayerNorm, check_positive_int
from ..nn.module import Module, ModuleList, Parameter
from . import io

__all__ = ["GPT2", "GPT2MLP", "GPT2Attention", "GPT2Block", "GPT2Config", "GPT2Model"]

# Activations GPT-2 checkpoints name in ``activation_function`` that minipeft computes.
# "gelu_new" and "gelu_pytorch_tanh" are the same tanh-approximated GELU (HF ACT2FN).
_ACTIVATIONS = {"gelu_new": ops.gelu, "gelu_pytorch_tanh": ops.gelu, "relu": ops.relu}

# Config policy (see GPT2Config): HF keys with no effect on the computation. ``n_ctx`` is
# GPT-2's legacy duplicate of n_positions (transformers ignores it too).
_IGNORED_KEYS = frozenset(
    {
        # provenance
        "architectures", "transformers_version", "_name_or_path", "_commit_hash",
        "dtype", "torch_dtype", "use_bfloat16", "n_ctx",
        # heads minipeft's GPT2 does not build (sequence summary / classification)
        "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
        "summary_type", "summary_use_proj", "id2label", "label2id", "num_labels",
        "problem_type", "finetuning_task",
        # tokenizer and generation settings (no effect on logits)
        "pad_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params",
        "tokenizer_class", "prefix", "use_cache", "max_length", "min_length", "do_sample",
        "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
        "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        # framework switches (outputs, tracing, attention kernel, chunking)
        "output_hidden_states", "output_attentions", "return_dict", "torchscript",
        "tf_legacy_loss", "chunk_size_feed_forward", "is_decoder",
        "cross_attention_hidden_size", "tie_encoder_decoder", "_attn_implementation",
        "_attn_implementation_autoset", "gradient_checkpointing",
        # only changes rounding in float16 (minipeft computes in float32/float64)
        "reorder_and_upcast_attn",
    }
)  # fmt: skip
# HF keys that WOULD change the network: accepted only at the values minipeft reproduces.
_ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "model_type": ("gpt2",),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "is_encoder_decoder": (False,),
    "pruned_heads": ({},),
}


def _probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")


@dataclasses.dataclass
class GPT2Config:
    """GPT-2 hyper-parameters; field names and defaults as HF ``GPT2Config`` (GPT-2 small).

    ``from_dict`` / ``from_json_file`` key policy — every key of a ``config.json`` is one of:
    * a field below — used (and validated);
    * an HF setting that would change the network but which minipeft does not model
      (``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``, ``add_cross_attention``,
      ``is_encoder_decoder``, ``pruned_heads``, ``model_type``) — accepted only at the value
      minipeft reproduces (True, False, False, False, {}, "gpt2"); another value is an error;
    * HF bookkeeping with no effect on the logits (``architectures``,
      ``transformers_version``, ``dtype``, ``n_ctx``, token ids other than bos/eos, the
      ``summary_*`` head settings, generation settings, … — ``_IGNORED_KEYS``) — dropped;
    * anything else — a CheckpointError naming the key: an unknown key may change the
      model, and silently ignoring it could load a different network than the one trained.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4·n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            check_positive_int(name, getattr(self, name))
        if self.n_inner is not None:
            check_positive_int("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd: must be divisible by n_head={self.n_head}, got n_embd={self.n_embd}"
            )
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function: expected one of {sorted(_ACTIVATIONS)}, "
                f"got {self.activation_function!r}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            _probability(name, getattr(self, name))
        if not isinstance(self.layer_norm_epsilon, int | float) or not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"layer_norm_epsilon: expected a positive number, got {self.layer_norm_epsilon!r}"
            )
        if not isinstance(self.initializer_range, int | float) or not self.initializer_range >= 0:
            raise ValueError(
                f"initializer_range: expected a non-negative number, got {self.initializer_range!r}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"tie_word_embeddings: expected true or false, got {self.tie_word_embeddings!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> GPT2Config:
        """A config from a dict such as HF's ``config.json`` (key policy: class docstring)."""
        return io.dataclass_from_dict(
            cls,
            data,
            ignored_keys=_IGNORED_KEYS,
            accepted_values=_ACCEPTED_VALUES,
            source=source,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPT2Config:
        """Read a ``config.json`` (key policy: class docstring)."""
        return io.read_json_config(
            path, cls, ignored_keys=_IGNORED_KEYS, accepted_values=_ACCEPTED_VALUES
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the HF keys ``transformers`` needs to rebuild the same network."""
        out = dataclasses.asdict(self)
        out.update(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            add_cross_attention=False,
        )
        return out


# ---------------------------------------------------------------------------- blocks
class GPT2Attention(Module):
    """Causal multi-head self-attention with a fused q|k|v projection (``c_attn``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        c = config.n_embd
        self.n_head, self.head_dim, self.n_embd = config.n_head, config.head_dim, c
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = Conv1D(c, 3 * c, std=config.initializer_range)
        # GPT-2's residual-scaled init: std / √(2·n_layer) for projections into the stream
        self.c_proj = Conv1D(c, c, std=config.initializer_range / math.sqrt(2 * config.n_layer))
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(
        self,
        x: Tensor,
        attn_mask: Any = None,
        prefix: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, T, C) → (B, T, C). ``attn_mask`` bool, broadcastable to (B, 1, T, P + T)."""
        b, t, c = x.shape
        h, d = self.n_head, self.head_dim
        q, k, v = ops.split(self.c_attn(x), 3, axis=-1)  # each (B, T, C), views of (B, T, 3C)
        # each (B, T, C) → (B, T, H, d) → (B, H, T, d)
        q, k, v = (ops.transpose(ops.reshape(z, (b, t, h, d)), (0, 2, 1, 3)) for z in (q, k, v))
        if prefix is not None:
            pk, pv = prefix
            k = ops.concat([pk, k], axis=2)  # (B, H, P + T, d)
            v = ops.concat([pv, v], axis=2)  # (B, H, P + T, d)
        y = scaled_dot_product_attention(
            q,
            k,
            v,
            causal=True,
            attn_mask=attn_mask,
            dropout_p=self.attn_pdrop,
            training=self.training,
        )  # (B, H, T, d)
        y = ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, c))  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(Module):
    """c_proj(act(c_fc(x))) with dropout — the position-wise feed-forward block."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        c, inner = config.n_embd, config.inner_dim
        self.c_fc = Conv1D(c, inner, std=config.initializer_range)
        self.c_proj = Conv1D(inner, c, std=config.initializer_range / math.sqrt(2 * config.n_layer))
        self.act = _ACTIVATIONS[config.activation_function]
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(Module):
    """Pre-LN transformer block: h + attn(ln_1(h)), then h + mlp(ln_2(h))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps=eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self, x: Tensor, attn_mask: Any = None, prefix: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, prefix)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT2Model(Module):
    """Embeddings, the stack of blocks and the final LayerNorm (HF's ``transformer``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        std = config.initializer_range
        self.wte = Embedding(config.vocab_size, config.n_embd, std=std)
        self.wpe = Embedding(config.n_positions, config.n_embd, std=std)
        self.drop = Dropout(config.embd_pdrop)
        self.h = ModuleList([GPT2Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


# ---------------------------------------------------------------------------- the model
class GPT2(Module):
    """GPT-2 with its language-model head: HF's ``GPT2LMHeadModel``, names and layouts.

    >>> model = GPT2(GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4))
    >>> logits = model(np.array([[1, 2, 3]]))          # (1, 3, 512)
    >>> loss = model.loss(np.array([[1, 2, 3]]))        # next-token cross-entropy
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config: expected a GPT2Config, got {type(config).__name__}")
        self.config = config
        self.transformer = GPT2Model(config)
        if not config.tie_word_embeddings:
            w = backend.rng().normal(
                0.0, config.initializer_range, (config.vocab_size, config.n_embd)
            )
            self.lm_head = _LMHead(Parameter(w.astype(backend.default_dtype())))

    @property
    def _xp(self) -> Any:
        """The array module where the model lives (NumPy or CuPy)."""
        return backend.xp_of(self.lm_head_weight.data)

    @property
    def lm_head_weight(self) -> Parameter:
        """The (vocab, C) output matrix: ``wte.weight`` when tied, else ``lm_head.weight``."""
        if self.config.tie_word_embeddings:
            return self.transformer.wte.weight
        return self.lm_head.weight

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Any = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Any = None,
        past_prefix: Sequence[tuple[Tensor, Tensor]] | None = None,
        position_ids: Any = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for ``input_ids`` (B, T) ints or ``inputs_embeds`` (B, T, C).

        Tied head: Z = ln_f(H)·Eᵀ with E = ``wte.weight`` itself, so its gradient is the sum
        of both uses, Ē = Z̄ᵀ·Ĥ + scatter_add(ids, H̄⁰).   [gpt2.tied_grad]

        attention_mask: (B, T), 1/True for real tokens and 0/False for padding. Real tokens
            never attend to padded keys; a padded position attends to itself, so its
            (meaningless) logits stay finite — exclude it from the loss (label −100).
        past_prefix: ``n_layer`` pairs (k, v), each (B or 1, H, P, head_dim), prepended to
            each layer's keys/values (prefix tuning); visible to every query.
        position_ids: (T,) or (B, T) ints; default P, P+1, …, P+T−1 (P = prefix length).
        """
        cfg = self.config
        x, b, t = self._embed_inputs(input_ids, inputs_embeds)
        p, prefix = self._check_prefix(past_prefix, b)
        if position_ids is None:
            if p + t > cfg.n_positions:
                raise ValueError(
                    f"input_ids: sequence length {t}"
                    + (f" + prefix length {p}" if p else "")
                    + f" exceeds n_positions={cfg.n_positions}"
                )
            position_ids = self._xp.arange(p, p + t)  # (T,) where the model lives
        else:
            position_ids = self._check_position_ids(position_ids, b, t)
        # positions are generated or checked above: no device round trip to re-check them
        x = x + self.transformer.wpe(position_ids, check_range=False)  # (B, T, C) + (T or B, T, C)
        x = self.transformer.drop(x)
        mask = self._attention_mask(attention_mask, b, t, p)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, None if prefix is None else prefix[i])  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        # logits = h·Eᵀ as one 2-D product (B·T, C)·(C, V)
        w = self.lm_head_weight
        logits = ops.matmul(ops.reshape(x, (b * t, cfg.n_embd)), ops.transpose(w, (1, 0)))
        return ops.reshape(logits, (b, t, cfg.vocab_size))  # (B, T, V)

    def loss(
        self,
        input_ids: Any = None,
        labels: Any = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Any = None,
        past_prefix: Sequence[tuple[Tensor, Tensor]] | None = None,
        position_ids: Any = None,
    ) -> Tensor:
        """Mean next-token cross-entropy: position t predicts ``labels[:, t + 1]``.   [gpt2.lm_loss]

        L = (1/|𝒱|) Σ_{(b,t)∈𝒱} [logsumexp(Z_{b,t}) − Z_{b,t,y_{b,t+1}}],
        𝒱 = {(b, t): t ≤ T − 2, y_{b,t+1} ≠ −100}.

        ``labels`` (B, T) ints, default ``input_ids``; entries equal to −100 are ignored
        (HF's convention: the labels are given unshifted and shifted here). Equivalent to
        HF ``GPT2LMHeadModel(input_ids, labels=labels).loss``.
        """
        if labels is None:
            if input_ids is None:
                raise ValueError("labels: required when the model is fed inputs_embeds")
            labels = input_ids
        labels = input_array(labels)
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels: expected integer token ids, got dtype {labels.dtype}")
        logits = self.forward(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_prefix=past_prefix,
            position_ids=position_ids,
        )  # (B, T, V)
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels: expected shape {logits.shape[:2]} (batch, sequence), got {labels.shape}"
            )
        # Shift the targets instead of slicing the logits (no (B, T−1, V) copy):
        # target[:, t] = labels[:, t + 1], and the last position predicts nothing.
        xp = self._xp
        targets = xp.full(labels.shape, -100, dtype=xp.int64)  # (B, T)
        targets[:, :-1] = backend.like(labels[:, 1:], logits.data)  # moved once at the entry
        # the labels were checked where they were given (the host, for NumPy labels)
        ops.check_index_range(labels[:, 1:], self.config.vocab_size, "labels", ignore=-100)
        return ops.cross_entropy(logits, targets, ignore_index=-100, check_range=False)

    # ------------------------------------------------------------------ input checks
    def _embed_inputs(
        self, input_ids: Any, inputs_embeds: Tensor | None
    ) -> tuple[Tensor, int, int]:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: give exactly one of them")
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, Tensor):
                raise TypeError(
                    f"inputs_embeds: expected a Tensor, got {type(inputs_embeds).__name__}"
                )
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.n_embd:
                raise ValueError(
                    f"inputs_embeds: expected shape (batch, sequence, {cfg.n_embd}), "
                    f"got {inputs_embeds.shape}"
                )
            if inputs_embeds.dtype != self.lm_head_weight.dtype:
                raise TypeError(
                    f"inputs_embeds: expected dtype {self.lm_head_weight.dtype} (the model's), "
                    f"got {inputs_embeds.dtype}"
                )
            b, t, _ = inputs_embeds.shape
            x = inputs_embeds
        else:
            ids = input_array(input_ids)
            if ids.dtype.kind not in "iu":
                raise TypeError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
            if ids.ndim != 2:
                raise ValueError(f"input_ids: expected shape (batch, sequence), got {ids.shape}")
            b, t = ids.shape
            if t and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
                raise ValueError(
                    f"input_ids: values must lie in [0, {cfg.vocab_size}) (vocab_size), got "
                    f"range [{int(ids.min())}, {int(ids.max())}]"
                )
            # validated where the ids were given, then moved to the model once
            ids = backend.like(ids, self.lm_head_weight.data)
            x = self.transformer.wte(ids, check_range=False)  # (B, T, C)
        if b == 0 or t == 0:
            raise ValueError(f"input_ids: expected a non-empty (batch, sequence), got ({b}, {t})")
        if t > cfg.n_positions:
            raise ValueError(
                f"input_ids: sequence length {t} exceeds n_positions={cfg.n_positions}"
            )
        return x, b, t

    def _check_prefix(
        self, past_prefix: Any, b: int
    ) -> tuple[int, list[tuple[Tensor, Tensor]] | None]:
        """Validate the per-layer prefix keys/values: (prefix length P, pairs as (B, H, P, d)).

        A (1, H, P, d) prefix is shared by the batch: it is broadcast by adding zeros of
        shape (B, 1, 1, 1), whose backward sums the gradient over the batch into it.
        """
        if past_prefix is None:
            return 0, None
        cfg = self.config
        if len(past_prefix) != cfg.n_layer:
            raise ValueError(
                f"past_prefix: expected {cfg.n_layer} (k, v) pairs (one per layer), "
                f"got {len(past_prefix)}"
            )
        plen = None
        out = []
        for i, pair in enumerate(past_prefix):
            if len(pair) != 2:
                raise ValueError(f"past_prefix[{i}]: expected a (k, v) pair")
            expanded = []
            for name, tns in zip("kv", pair):
                if not isinstance(tns, Tensor):
                    raise TypeError(f"past_prefix[{i}].{name}: expected a Tensor")
                s = tns.shape
                if (
                    len(s) != 4
                    or s[0] not in (1, b)
                    or s[1] != cfg.n_head
                    or s[3] != cfg.head_dim
                    or (plen is not None and s[2] != plen)
                ):
                    raise ValueError(
                        f"past_prefix[{i}].{name}: expected shape ({b} or 1, {cfg.n_head}, "
                        f"{'P' if plen is None else plen}, {cfg.head_dim}), got {s}"
                    )
                if tns.dtype != self.lm_head_weight.dtype:
                    raise TypeError(
                        f"past_prefix[{i}].{name}: expected dtype {self.lm_head_weight.dtype} "
                        f"(the model's), got {tns.dtype}"
                    )
                plen = s[2]
                if s[0] != b:  # shared by the batch: (1, H, P, d) + 0 (B, 1, 1, 1)
                    zeros = backend.xp_of(tns.data).zeros((b, 1, 1, 1), dtype=tns.dtype)
                    tns = tns + Tensor(zeros)  # (B, H, P, d)
                expanded.append(tns)
            out.append((expanded[0], expanded[1]))
        return int(plen), out

    def _check_position_ids(self, position_ids: Any, b: int, t: int) -> Any:
        pos = input_array(position_ids)
        if pos.dtype.kind not in "iu":
            raise TypeError(f"position_ids: expected integers, got dtype {pos.dtype}")
        if pos.shape not in ((t,), (1, t), (b, t)):
            raise ValueError(f"position_ids: expected shape ({t},) or ({b}, {t}), got {pos.shape}")
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.config.n_positions):
            raise ValueError(
                f"position_ids: values must lie in [0, {self.config.n_positions}) (n_positions), "
                f"got range [{int(pos.min())}, {int(pos.max())}]"
            )
        return backend.like(pos, self.lm_head_weight.data)

    def _attention_mask(self, attention_mask: Any, b: int, t: int, p: int) -> Any:
        """Key-padding mask (B, T) → bool (B, 1, T, P + T), or None (causal mask only)."""
        if attention_mask is None:
            return None
        m = input_array(attention_mask)
        if m.dtype.kind not in "biu":
            raise TypeError(f"attention_mask: expected 0/1 integers or booleans, got {m.dtype}")
        if m.shape != (b, t):
            raise ValueError(f"attention_mask: expected shape ({b}, {t}), got {m.shape}")
        if m.dtype != bool:
            if m.size and bool(((m != 0) & (m != 1)).any()):
                raise ValueError("attention_mask: integer masks must hold only 0 and 1")
            m = m.astype(bool)
        xp, m = self._xp, backend.like(m, self.lm_head_weight.data)  # moved once
        keys = xp.concatenate([xp.ones((b, p), dtype=bool), m], axis=1)  # (B, P + T)
        allowed = xp.broadcast_to(keys[:, None, None, :], (b, 1, t, p + t)).copy()
        # a query always sees itself: a padded query row is never empty (finite output)
        diag = xp.arange(t)
        allowed[:, :, diag, p + diag] = True  # (B, 1, T, P + T)
        return allowed

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: Any = None) -> GPT2:
        """Load ``config.json`` + ``model.safetensors`` written by transformers or by minipeft.

        Every tensor name and shape is validated before anything is copied; errors name the
        file, the tensor, the expected and the actual shape. Weights are cast to ``dtype``
        (default: minipeft's default dtype, float32). The model is returned in eval mode
        (dropout off), as transformers does. Never unpickles anything.
        """
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"directory: {d} is not a directory")
        weights = d / "model.safetensors"
        if not weights.is_file():
            others = sorted(
                x.name
                for x in d.iterdir()
                if x.name.endswith((".bin", ".pt", ".pth", ".ckpt", ".index.json"))
            )
            hint = (
                f" (found {others}: minipeft reads only a single model.safetensors and never "
                "unpickles .bin/.pt files; convert with transformers' save_pretrained)"
                if others
                else ""
            )
            raise FileNotFoundError(f"{weights}: no such file{hint}")
        config = GPT2Config.from_json_file(d / "config.json")
        c = config  # the config's sizes must match the file's before anything is built
        bare = "wte.weight" in io.read_safetensors_header(weights)
        io.check_config_sizes(
            d / "config.json",
            weights,
            {
                "wte.weight": (("vocab_size", c.vocab_size), ("n_embd", c.n_embd)),
                "wpe.weight": (("n_positions", c.n_positions), ("n_embd", c.n_embd)),
                "h.0.mlp.c_fc.weight": (("n_embd", c.n_embd), ("n_inner", c.inner_dim)),
            },
            ("h.", "n_layer", c.n_layer),
            prefix="" if bare else "transformer.",
        )
        dt = np.dtype(dtype) if dtype is not None else backend.default_dtype()
        with backend.dtype_policy(dt):
            model = cls(config)
        tensors = io.load_safetensors(weights, dtype=dt)
        state = model._canonical_state(tensors, weights)
        io.check_tensors(state, {k: v.shape for k, v in model.state_dict().items()}, source=weights)
        model.load_state_dict(state)
        return model.eval()

    def _canonical_state(self, tensors: dict[str, np.ndarray], source: Path) -> dict[str, Any]:
        """Map a checkpoint's names onto ours (bare GPT2Model names, legacy buffers, tying)."""
        out: dict[str, Any] = {}
        bare = not any(k.startswith("transformer.") for k in tensors)
        for name, arr in tensors.items():
            key = f"transformer.{name}" if bare and name != "lm_head.weight" else name
            parts = key.split(".")
            # legacy causal-mask buffers transformer.h.{i}.attn.bias / .masked_bias
            if len(parts) == 5 and parts[:2] == ["transformer", "h"] and parts[3] == "attn":
                if parts[4] in ("bias", "masked_bias"):
                    continue
            out[key] = arr
        if self.config.tie_word_embeddings and "lm_head.weight" in out:
            head = out.pop("lm_head.weight")
            wte = out.get("transformer.wte.weight")
            if wte is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
                raise io.CheckpointError(
                    f"{source}: lm_head.weight differs from transformer.wte.weight but the "
                    "config ties them (tie_word_embeddings=true)"
                )
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` in the layout transformers loads.

        Like transformers 5.x, a tied model's file has no ``lm_head.weight``. The directory
        is written atomically (``minipeft.io.atomic_directory``): a crash leaves the old
        weights and config or the new ones, never new weights with an old config.
        """
        from ..io import atomic_directory

        d = Path(directory)
        cfg = self.config.to_dict()
        cfg["dtype"] = str(self.lm_head_weight.dtype)
        with atomic_directory(d) as tmp:  # weights and config replaced together
            io.save_safetensors_atomic(
                tmp / "model.safetensors", self.state_dict(), {"format": "pt"}
            )
            io.write_json_atomic(tmp / "config.json", cfg)
        return d


class _LMHead(Module):
    """An untied output matrix (vocab, C), named ``lm_head.weight`` like HF's nn.Linear."""

    def __init__(self, weight: Parameter) -> None:
        super().__init__()
        self.weight = weight
