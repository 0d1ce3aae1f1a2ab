"""Virtual-token methods for GPT-2 and BERT: prompt tuning, prefix tuning, P-tuning v2, PreLayer.

All of them add P trainable "virtual tokens" and leave every pretrained weight frozen. They
differ in WHERE the virtual tokens enter (derivations/adapters_prompts.md):

    PromptTuning  (Lester et al., 2021; the LoRA paper's PreEmbed with l_i = 0)
        soft prompt E_p (P, C) prepended to the input embeddings only.       P·C params
    PrefixLayer   (the LoRA paper's PreLayer; the lecture's "deep prompt" equation
        H_i = [P_i; Layer_i(H_{i−1})]): hidden states of the P virtual positions replaced
        by trainable vectors P_l (P, C) at the input of every layer l.        L·P·C params
        Since nothing after layer l reads P_l except through that layer's key/value
        projections, it equals a key/value prefix K_l = W_k·g(P_l), V_l = W_v·g(P_l)
        (g = ln_1 in GPT-2, identity in BERT) — that is how it is computed here.
    PrefixTuning  (Li & Liang, 2021): free key and value prefixes at every layer,
        (K_l, V_l) each (P, C), produced during training by a reparametrization MLP
        KV = W₂·tanh(W₁·P' + b₁) + b₂ from a small P' (P, C'); ``fold()`` evaluates the MLP
        once and keeps only the 2·L·P·C numbers (the MLP is dropped after training).
    PTuningV2     (Liu et al., 2022): the same per-layer key/value prefixes ("deep prompt
        tuning", past_key_values in the authors' code) WITHOUT the reparametrization by
        default, trained with a task head on the encoder's states (no verbalizer).
        At the level of the attention it is prefix tuning; what differs is the recipe.

Virtual keys are visible to every query (GPT-2's causal rule lets query i see key j iff
j ≤ i + P). ``PromptedModel`` returns the outputs of the REAL tokens only, so pooling and
the loss never see the virtual positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import backend
from ..autograd import ops
from ..autograd.tensor import Tensor, input_array, no_grad
from ..nn.layers import Linear
from ..nn.module import Module, Parameter

__all__ = [
    "ModelSpec",
    "PTuningV2",
    "PrefixLayer",
    "PrefixTuning",
    "PromptTuning",
    "PromptedModel",
    "model_spec",
    "prefix_gate",
    "prefix_grads",
    "prepend_prompt",
]


# ---------------------------------------------------------------------------- model facts
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The sizes a virtual-token method needs from GPT-2 or BERT."""

    kind: str  # "gpt2" | "bert"
    n_layer: int
    n_head: int
    head_dim: int
    hidden: int
    n_positions: int


def model_spec(model: Module) -> ModelSpec:
    """Sizes of a minipeft ``GPT2`` or ``BertModel`` (TypeError for anything else)."""
    from ..models.bert import BertModel
    from ..models.gpt2 import GPT2

    if isinstance(model, GPT2):
        c = model.config
        return ModelSpec("gpt2", c.n_layer, c.n_head, c.head_dim, c.n_embd, c.n_positions)
    if isinstance(model, BertModel):
        c = model.config
        return ModelSpec(
            "bert", c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.hidden_size,
            c.max_position_embeddings,
        )  # fmt: skip
    raise TypeError(f"model: expected a minipeft GPT2 or BertModel, got {type(model).__name__}")


def _check_length(spec: ModelSpec, num_virtual_tokens: Any) -> int:
    p = num_virtual_tokens
    if isinstance(p, bool) or not isinstance(p, int | np.integer):
        raise TypeError(f"num_virtual_tokens: expected an int, got {type(p).__name__}")
    if p < 1:
        raise ValueError(f"num_virtual_tokens: expected at least 1 virtual token, got {p}")
    if p >= spec.n_positions:
        raise ValueError(
            f"num_virtual_tokens: {p} virtual tokens leave no room for text in the model's "
            f"context of n_positions={spec.n_positions}; expected at most {spec.n_positions - 1}"
        )
    return int(p)


def _per_layer(kv: Tensor, spec: ModelSpec, b: int) -> list[tuple[Tensor, Tensor]]:
    """(L, 2, P, C) key/value rows → L pairs of (B, H, P, d) tensors."""
    n_l, _, p, _ = kv.shape
    x = ops.reshape(kv, (n_l, 2, 1, p, spec.n_head, spec.head_dim))  # (L, 2, 1, P, H, d)
    x = ops.transpose(x, (0, 1, 2, 4, 3, 5))  # (L, 2, 1, H, P, d)
    zeros = Tensor(backend.xp_of(kv.data).zeros((1, 1, b, 1, 1, 1), dtype=kv.dtype))
    x = x + zeros  # (L, 2, B, H, P, d): the same prefix for every sequence of the batch
    return [(x[i, 0], x[i, 1]) for i in range(n_l)]


# ---------------------------------------------------------------------------- methods
class PromptTuning(Module):
    """Soft prompt E_p (P, C) prepended to the input embeddings: P·C trainable numbers.

    init: "random" — N(0, std²) rows; "vocab" — rows of the model's word embeddings for
    ``init_token_ids`` (e.g. the ids of a task description), repeated to fill P rows as
    HF PEFT does (Lester et al., 2021, §2.2 initialize from vocabulary embeddings).
    """

    deep = False

    def __init__(
        self,
        model: Module,
        num_virtual_tokens: int,
        *,
        init: str = "random",
        init_token_ids: Sequence[int] | None = None,
        std: float = 0.02,
    ) -> None:
        super().__init__()
        spec = model_spec(model)
        p = _check_length(spec, num_virtual_tokens)
        self.spec, self.num_virtual_tokens = spec, p
        if init == "random":
            w = backend.rng().normal(0.0, std, (p, spec.hidden)).astype(backend.default_dtype())
        elif init == "vocab":
            table = _word_embeddings(model)
            ids = np.asarray(init_token_ids if init_token_ids is not None else [], dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError("init_token_ids: expected a non-empty list of token ids")
            if ids.min() < 0 or ids.max() >= table.shape[0]:
                raise ValueError(
                    f"init_token_ids: ids must lie in [0, {table.shape[0]}), "
                    f"got range [{ids.min()}, {ids.max()}]"
                )
            w = backend.to_numpy(table)[np.resize(ids, p)].copy()  # (P, C), ids repeated
        else:
            raise ValueError(f"init: expected 'random' or 'vocab', got {init!r}")
        self.prompt = Parameter(w)  # (P, C)

    def prompt_embeddings(self) -> Tensor:
        return self.prompt


def _word_embeddings(model: Module) -> Any:
    spec = model_spec(model)
    if spec.kind == "gpt2":
        return model.transformer.wte.weight.data
    return model.embeddings.word_embeddings.weight.data


class PrefixTuning(Module):
    """Key/value prefixes at every layer, (L, 2, P, C); reparametrized by an MLP in training.

    reparam_hidden: width of the MLP KV = W₂·tanh(W₁·P' + b₁) + b₂ (Li & Liang, §4.3),
        P' (P, C); None trains the prefixes directly. ``fold()`` evaluates the MLP once
        and keeps only the prefixes (2·L·P·C numbers).
    """

    deep = True

    def __init__(
        self,
        model: Module,
        num_virtual_tokens: int,
        *,
        reparam_hidden: int | None = 128,
        std: float = 0.02,
    ) -> None:
        super().__init__()
        spec = model_spec(model)
        p = _check_length(spec, num_virtual_tokens)
        self.spec, self.num_virtual_tokens = spec, p
        dt, rng = backend.default_dtype(), backend.rng()
        out = spec.n_layer * 2 * spec.hidden
        if reparam_hidden is None:
            self.reparam = False
            w = rng.normal(0.0, std, (spec.n_layer, 2, p, spec.hidden))
            self.prefix = Parameter(w.astype(dt))  # (L, 2, P, C)
        else:
            if isinstance(reparam_hidden, bool) or not isinstance(reparam_hidden, int):
                raise TypeError(f"reparam_hidden: expected an int or None, got {reparam_hidden!r}")
            if reparam_hidden < 1:
                raise ValueError(f"reparam_hidden: expected at least 1, got {reparam_hidden}")
            self.reparam = True
            self.embedding = Parameter(rng.normal(0.0, 1.0, (p, spec.hidden)).astype(dt))
            self.mlp_in = Linear(spec.hidden, reparam_hidden)
            self.mlp_out = Linear(reparam_hidden, out)

    def key_values(self, model: Module | None = None) -> Tensor:
        """The (L, 2, P, C) prefix rows.   [prefix.reparam]

        With the reparametrization: KV = reshape(W₂·tanh(W₁·P' + b₁) + b₂), P' (P, C).
        """
        if not self.reparam:
            return self.prefix
        s, p = self.spec, self.num_virtual_tokens
        # W₂·tanh(W₁·P' + b₁) + b₂
        flat = self.mlp_out(ops.tanh(self.mlp_in(self.embedding)))  # (P, L·2·C)
        kv = ops.reshape(flat, (p, s.n_layer, 2, s.hidden))  # (P, L, 2, C)
        return ops.transpose(kv, (1, 2, 0, 3))  # (L, 2, P, C)

    def past_prefix(self, model: Module, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return _per_layer(self.key_values(model), self.spec, batch_size)

    def folded(self, model: Module | None = None) -> PrefixTuning:
        """A reparametrization-free copy holding the evaluated prefixes (drop the MLP)."""
        with no_grad():
            kv = backend.to_numpy(self.key_values(model).data).copy()
        out = PrefixTuning.__new__(PrefixTuning)
        Module.__init__(out)
        out.spec, out.num_virtual_tokens, out.reparam = self.spec, self.num_virtual_tokens, False
        out.prefix = Parameter(kv)  # (L, 2, P, C)
        return out


class PTuningV2(PrefixTuning):
    """P-tuning v2 (Liu et al., 2022): deep prompts as per-layer key/value prefixes.

    Identical attention to ``PrefixTuning``; the reparametrization is off by default (the
    paper found it task-dependent), and it is meant to be trained with a task head.
    """

    def __init__(
        self,
        model: Module,
        num_virtual_tokens: int,
        *,
        reparam_hidden: int | None = None,
        std: float = 0.02,
    ) -> None:
        super().__init__(model, num_virtual_tokens, reparam_hidden=reparam_hidden, std=std)


class PrefixLayer(Module):
    """The LoRA paper's PreLayer: trainable hidden states P_l (P, C) at every layer's input.

    Computed as a key/value prefix through the frozen projections of layer l:
        GPT-2: [q|K_l|V_l] = c_attn(ln_1(P_l));   BERT: K_l = key(P_l), V_l = value(P_l).
    """

    deep = True

    def __init__(self, model: Module, num_virtual_tokens: int, *, std: float = 0.02) -> None:
        super().__init__()
        spec = model_spec(model)
        p = _check_length(spec, num_virtual_tokens)
        self.spec, self.num_virtual_tokens = spec, p
        w = backend.rng().normal(0.0, std, (spec.n_layer, p, spec.hidden))
        self.hidden = Parameter(w.astype(backend.default_dtype()))  # (L, P, C)

    def key_values(self, model: Module) -> Tensor:
        """(L, 2, P, C): K_l = W_k·g(P_l) + b_k, V_l = W_v·g(P_l) + b_v.   [prefix.layer_fold]"""
        s = self.spec
        if model_spec(model) != s:
            raise ValueError("model: not the model this PrefixLayer was built for")
        rows = []
        for i in range(s.n_layer):
            h = self.hidden[i]  # (P, C)
            if s.kind == "gpt2":
                block = model.transformer.h[i]
                qkv = block.attn.c_attn(block.ln_1(h))  # (P, 3C) = [q | k | v]
                k, v = qkv[:, s.hidden : 2 * s.hidden], qkv[:, 2 * s.hidden :]
            else:
                att = model.encoder.layer[i].attention.self
                k, v = att.key(h), att.value(h)  # (P, C) each
            rows.append(ops.stack([k, v], axis=0))  # (2, P, C)
        return ops.stack(rows, axis=0)  # (L, 2, P, C)

    def past_prefix(self, model: Module, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return _per_layer(self.key_values(model), self.spec, batch_size)

    def folded(self, model: Module) -> PrefixTuning:
        """The equivalent plain key/value prefix (for the frozen ``model``)."""
        return PrefixTuning.folded(self, model)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the wrapper
def prepend_prompt(soft: Tensor, emb: Tensor) -> Tensor:
    """X_b = [E_p; E(ids_b)] for every sequence b: (P, C), (B, T, C) → (B, P + T, C).

    The same E_p is used by every sequence (a broadcast), so its gradient is the sum over
    the batch of the input-gradient rows of the virtual positions:
    Ē_p = Σ_b X̄_b[:P].   [prompt.grad]
    """
    b = emb.shape[0]
    p, c = soft.shape
    zeros = Tensor(backend.xp_of(emb.data).zeros((b, 1, 1), dtype=emb.dtype))
    rows = ops.reshape(soft, (1, p, c)) + zeros  # (B, P, C): broadcast, summed in backward
    return ops.concat([rows, emb], axis=1)  # (B, P + T, C)


class PromptedModel(Module):
    """A frozen GPT-2/BERT with a virtual-token method; outputs cover the real tokens only.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns what the base
    model returns (GPT-2: logits (B, T, V); BERT: hidden states (B, T, C)) for the T real
    tokens — the P virtual positions of prompt tuning are cut off, so a mean pooling over
    ``attention_mask`` excludes them.
    """

    def __init__(self, base: Module, prompt: Module, *, freeze_base: bool = True) -> None:
        super().__init__()
        spec = model_spec(base)
        if not isinstance(prompt, PromptTuning | PrefixTuning | PrefixLayer):
            raise TypeError(f"prompt: expected a virtual-token method, got {type(prompt).__name__}")
        if prompt.spec != spec:
            raise ValueError("prompt: was built for a model of other sizes than base")
        if freeze_base:
            base.requires_grad_(False)
        self.base, self.prompt, self.spec = base, prompt, spec

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    def _inputs(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> dict[str, Any]:
        ids = input_array(input_ids)  # checked where given, moved once below
        if ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (B, T), got {ids.shape}")
        b, t = ids.shape
        kw: dict[str, Any] = {}
        if self.prompt.deep:  # key/value prefixes: the text is fed as is
            kw["past_prefix"] = self.prompt.past_prefix(self.base, b)
            kw["input_ids"], kw["attention_mask"] = ids, attention_mask
            if self.spec.kind == "bert":
                kw["token_type_ids"] = token_type_ids
            return kw
        p = self.num_virtual_tokens
        table = (
            self.base.transformer.wte
            if self.spec.kind == "gpt2"
            else self.base.embeddings.word_embeddings
        )
        ops.check_index_range(ids, table.num_embeddings, "input_ids")
        words = table(backend.like(ids, table.weight.data), check_range=False)
        kw["inputs_embeds"] = prepend_prompt(self.prompt.prompt_embeddings(), words)
        # masks and type ids are built where they were given; the model moves them once
        m = np.ones((b, t), dtype=np.int64) if attention_mask is None else attention_mask
        m = input_array(m).astype(np.int64)
        xp = backend.xp_of(m)
        kw["attention_mask"] = xp.concatenate([xp.ones((b, p), dtype=xp.int64), m], axis=1)
        if self.spec.kind == "bert":
            tt = np.zeros((b, t), dtype=np.int64) if token_type_ids is None else token_type_ids
            tt = input_array(tt).astype(np.int64)
            xt = backend.xp_of(tt)
            kw["token_type_ids"] = xt.concatenate([xt.zeros((b, p), dtype=xt.int64), tt], axis=1)
        return kw

    def forward(
        self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None
    ) -> Tensor:
        kw = self._inputs(input_ids, attention_mask, token_type_ids)
        out = self.base(**kw) if self.spec.kind == "bert" else self._gpt2(kw)
        if not self.prompt.deep:
            out = out[:, self.num_virtual_tokens :]  # (B, T, ·): real tokens only
        return out

    def _gpt2(self, kw: dict[str, Any]) -> Tensor:
        ids = kw.pop("input_ids", None)
        return self.base(ids, **kw)

    def loss(self, input_ids: Any, labels: Any = None, attention_mask: Any = None) -> Tensor:
        """GPT-2's next-token loss over the real tokens, with HF PEFT's conventions.

        Prompt tuning: the virtual positions carry label −100, so the last one predicts the
        first real token. Key/value prefixes: tokens 1…T−1 are predicted, as without prefix.
        """
        if self.spec.kind != "gpt2":
            raise TypeError("loss: only for GPT-2 (use a task head on BERT's states)")
        ids = input_array(input_ids)
        labels = ids if labels is None else input_array(labels)
        kw = self._inputs(ids, attention_mask, None)
        if self.prompt.deep:
            return self.base.loss(kw.pop("input_ids"), labels, **kw)
        xp = backend.xp_of(labels)
        pad = xp.full((ids.shape[0], self.num_virtual_tokens), -100, dtype=labels.dtype)
        return self.base.loss(None, xp.concatenate([pad, labels], axis=1), **kw)

    def fold(self) -> PromptedModel:
        """Replace a reparametrized prefix or a PreLayer by its plain key/value prefix."""
        if self.prompt.deep:
            self.prompt = self.prompt.folded(self.base)
        return self


# ---------------------------------------------------------------------------- closed forms
def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def prefix_gate(q: np.ndarray, pk: np.ndarray, k: np.ndarray) -> np.ndarray:
    """λ(q) = Σᵢ e^{q·pkᵢ/√d} / (Σᵢ e^{q·pkᵢ/√d} + Σⱼ e^{q·kⱼ/√d}), rows q (Tq, d).   [prefix.gate]

    He et al. (2022), eq. 7: attention over [P_k; K] equals
    (1 − λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v) (no mask: every key visible).
    """
    d = q.shape[-1]
    sp = q @ pk.T / np.sqrt(d)  # (Tq, P)
    sk = q @ k.T / np.sqrt(d)  # (Tq, Tk)
    m = np.maximum(sp.max(axis=-1, keepdims=True), sk.max(axis=-1, keepdims=True))
    ep, ek = np.exp(sp - m).sum(-1), np.exp(sk - m).sum(-1)
    return ep / (ep + ek)  # (Tq,)


def prefix_grads(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, pk: np.ndarray, pv: np.ndarray, g: np.ndarray
) -> dict[str, np.ndarray]:
    """∂L/∂P_k, ∂L/∂P_v of O = softmax(Q[P_k; K]ᵀ/√d)·[P_v; V] with Ō = G (no mask).   [prefix.grad]

    A = softmax(S) over all P + T keys, A_p its first P columns;
    P̄_v = A_pᵀ·G;  dS = A ⊙ (G·[P_v; V]ᵀ − rowsum(A ⊙ G·[P_v; V]ᵀ));  P̄_k = dS_pᵀ·Q/√d.
    """
    d = q.shape[-1]
    p = pk.shape[0]
    kk, vv = np.concatenate([pk, k]), np.concatenate([pv, v])  # (P + T, d)
    a = _softmax(q @ kk.T / np.sqrt(d))  # (Tq, P + T)
    da = g @ vv.T  # (Tq, P + T)
    ds = a * (da - (a * da).sum(-1, keepdims=True))  # (Tq, P + T)
    return {"pv": a[:, :p].T @ g, "pk": ds[:, :p].T @ q / np.sqrt(d)}
