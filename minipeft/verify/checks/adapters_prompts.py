"""Checks for derivations/adapters_prompts.md: bottleneck adapters, prefixes, prompts.

Gradients against float64 central differences; forwards against NumPy formulas written
here; counts against the LoRA paper's formulas (``counts.adapter_params``, the published
AdapterH/AdapterL expression); the PreLayer fold against a literal run that replaces the
virtual positions' hidden states before every block.
"""

from __future__ import annotations

import numpy as np

from ... import backend
from ...autograd import ops
from ...autograd.gradcheck import numerical_grad, rel_error
from ...autograd.tensor import Tensor, no_grad
from ...models.bert import BertConfig, BertModel
from ...models.gpt2 import GPT2, GPT2Config
from ...nn.attention import scaled_dot_product_attention
from ...peft.adapters import adapter, adapter_grads, add_adapters
from ...peft.counts import adapter_params
from ...peft.prompts import (
    PrefixLayer,
    PrefixTuning,
    PromptedModel,
    PromptTuning,
    prefix_gate,
    prefix_grads,
    prepend_prompt,
)
from ..registry import Outcome, equation


# ---------------------------------------------------------------------------- adapters
def _adapter_case(act: str = "relu") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(60)
    c = {
        "h": rng.standard_normal((4, 5)),
        "w_down": rng.standard_normal((3, 5)) * 0.7,
        "b_down": rng.standard_normal(3) * 0.3,
        "w_up": rng.standard_normal((5, 3)) * 0.7,
        "b_up": rng.standard_normal(5) * 0.3,
        "G": rng.standard_normal((4, 5)),
    }
    z = c["h"] @ c["w_down"].T + c["b_down"]
    assert np.abs(z).min() > 1e-3  # off the ReLU kink: central differences are exact there
    return c


_ORDER = ("h", "w_down", "b_down", "w_up", "b_up")


def _adapter_grad_check(names: tuple[str, ...]) -> Outcome:
    errs = []
    arrays: dict[str, np.ndarray] = {}
    for act in ("relu", "gelu"):
        c = _adapter_case(act)
        inputs = [c[k] for k in _ORDER]
        closed = adapter_grads(*inputs, c["G"], act=act)
        ts = [Tensor(v, requires_grad=True) for v in inputs]
        adapter(*ts, act=act).backward(c["G"])
        for name in names:
            i = _ORDER.index(name)
            fd = numerical_grad(lambda *a, f=act: adapter(*a, act=f), inputs, i, weights=c["G"])
            errs += [rel_error(closed[name], fd, atol=1e-8), rel_error(ts[i].grad, fd, atol=1e-8)]
            if act == "relu":
                arrays[f"grad_{name}"] = closed[name]
        if act == "relu":
            arrays.update(c)
    return Outcome(error=max(errs), arrays=arrays)


@equation(
    "adapters.forward",
    what="Adapter(h) = h + W_up·f(W_down·h + b_down) + b_up",
    derivation="adapters_prompts.md",
    implements=adapter,
    tol=1e-12,
)
def _check_adapter_forward() -> Outcome:
    c = _adapter_case()
    inputs = [c[k] for k in _ORDER]
    ref = c["h"] + np.maximum(c["h"] @ c["w_down"].T + c["b_down"], 0) @ c["w_up"].T + c["b_up"]
    y = adapter(*[Tensor(v) for v in inputs]).data
    arrays = {k: c[k] for k in _ORDER}
    arrays["y"] = ref
    return Outcome(error=rel_error(y, ref), arrays=arrays)


@equation(
    "adapters.grad_W_up",
    what="∂L/∂W_up = Gᵀ·f(Z), ∂L/∂b_up = Σₙ Gₙ (closed form and autograd vs finite differences)",
    derivation="adapters_prompts.md",
    implements=adapter_grads,
    tol=1e-6,
)
def _check_adapter_grad_up() -> Outcome:
    return _adapter_grad_check(("w_up", "b_up"))


@equation(
    "adapters.grad_W_down",
    what="∂L/∂W_down = Dᵀ·H, D = (G·W_up) ⊙ f'(Z); ∂L/∂b_down = Σₙ Dₙ; ∂L/∂H = G + D·W_down",
    derivation="adapters_prompts.md",
    implements=adapter_grads,
    tol=1e-6,
)
def _check_adapter_grad_down() -> Outcome:
    return _adapter_grad_check(("w_down", "b_down", "h"))


def _tiny_gpt2() -> GPT2:
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2(cfg).eval()


def _tiny_bert() -> BertModel:
    cfg = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False).eval()


@equation(
    "adapters.count",
    what="|Θ| = L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d (LoRA paper AdapterH/AdapterL)",
    derivation="adapters_prompts.md",
    implements=add_adapters,
    tol=0.0,
)
def _check_adapter_count() -> Outcome:
    got, want = [], []
    for build, n_layer, n_ln in ((_tiny_gpt2, 2, 2), (_tiny_bert, 2, 2)):
        for kind, per_layer in (("houlsby", 2), ("pfeiffer", 1)):
            for ln in (False, True):
                got.append(add_adapters(build(), kind, 3, train_layernorm=ln))
                want.append(adapter_params(per_layer * n_layer, 8, 3, n_ln * n_layer if ln else 0))
    got_a, want_a = np.array(got), np.array(want)
    return Outcome(error=float(np.abs(got_a - want_a).max()), arrays={"counts": got_a})


# ---------------------------------------------------------------------------- prefixes
def _attn_case() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(61)
    return {
        "q": rng.standard_normal((5, 4)),
        "k": rng.standard_normal((5, 4)),
        "v": rng.standard_normal((5, 4)),
        "pk": rng.standard_normal((3, 4)),
        "pv": rng.standard_normal((3, 4)),
        "G": rng.standard_normal((5, 4)),
    }


def _np_attn(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = q @ k.T / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    return (a / a.sum(-1, keepdims=True)) @ v


def _sdpa_prefix(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
    def four(t: Tensor) -> Tensor:
        return ops.reshape(t, (1, 1, *t.shape))  # (1, 1, T, d)

    kk = ops.concat([four(pk), four(k)], axis=2)  # (1, 1, P + T, d)
    vv = ops.concat([four(pv), four(v)], axis=2)
    out = scaled_dot_product_attention(four(q), kk, vv, causal=False)  # (1, 1, Tq, d)
    return ops.reshape(out, q.shape)


@equation(
    "prefix.gate",
    what="Attn(q,[P_k;K],[P_v;V]) = (1−λ(q))·Attn(q,K,V) + λ(q)·Attn(q,P_k,P_v) (He et al. 2022)",
    derivation="adapters_prompts.md",
    implements=prefix_gate,
    tol=1e-12,
)
def _check_prefix_gate() -> Outcome:
    c = _attn_case()
    lam = prefix_gate(c["q"], c["pk"], c["k"])[:, None]  # (Tq, 1)
    mixed = (1 - lam) * _np_attn(c["q"], c["k"], c["v"]) + lam * _np_attn(c["q"], c["pk"], c["pv"])
    names = ("q", "k", "v", "pk", "pv")
    out = _sdpa_prefix(*[Tensor(c[n]) for n in names]).data
    arrays = {n: c[n] for n in names}
    arrays.update(lam=lam[:, 0], out=out)
    return Outcome(error=rel_error(out, mixed), arrays=arrays)


@equation(
    "prefix.grad",
    what="P̄_v = A_pᵀ·G, P̄_k = dS_pᵀ·Q/√d (closed form and autograd vs finite differences)",
    derivation="adapters_prompts.md",
    implements=prefix_grads,
    tol=1e-6,
)
def _check_prefix_grad() -> Outcome:
    c = _attn_case()
    names = ("q", "k", "v", "pk", "pv")
    inputs = [c[n] for n in names]
    closed = prefix_grads(*inputs, c["G"])
    ts = [Tensor(v, requires_grad=True) for v in inputs]
    _sdpa_prefix(*ts).backward(c["G"])
    errs = []
    for name in ("pk", "pv"):
        i = names.index(name)
        fd = numerical_grad(_sdpa_prefix, inputs, i, weights=c["G"])
        errs += [rel_error(closed[name], fd, atol=1e-8), rel_error(ts[i].grad, fd, atol=1e-8)]
    arrays = dict(c, grad_pk=closed["pk"], grad_pv=closed["pv"])
    return Outcome(error=max(errs), arrays=arrays)


@equation(
    "prefix.reparam",
    what="[K;V] = reshape(W₂·tanh(W₁·P' + b₁) + b₂); folding into plain prefixes keeps outputs",
    derivation="adapters_prompts.md",
    implements=PrefixTuning.key_values,
    tol=1e-12,
)
def _check_prefix_reparam() -> Outcome:
    with backend.dtype_policy("float64"):
        backend.seed(62)
        model = _tiny_gpt2()
        pt = PrefixTuning(model, 3, reparam_hidden=6)
        e, w1, b1 = pt.embedding.data, pt.mlp_in.weight.data, pt.mlp_in.bias.data
        w2, b2 = pt.mlp_out.weight.data, pt.mlp_out.bias.data
        flat = np.tanh(e @ w1.T + b1) @ w2.T + b2  # (P, L·2·C)
        ref = flat.reshape(3, 2, 2, 8).transpose(1, 2, 0, 3)  # (L, 2, P, C)
        kv = pt.key_values(model).data
        pm = PromptedModel(model, pt)
        ids = np.array([[1, 5, 7, 2], [3, 3, 9, 0]])
        mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
        with no_grad():
            before = pm(ids, mask).data.copy()
            after = pm.fold()(ids, mask).data
    err = max(rel_error(kv, ref), float(np.abs(after - before).max()))
    return Outcome(error=err, arrays={"P_prime": e, "W1": w1, "b1": b1, "W2": w2, "b2": b2,
                                      "kv": ref})  # fmt: skip


def _literal_prelayer(model, hidden: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Run the blocks on [P_l; H] with the virtual rows replaced before every block."""
    b, t = ids.shape
    p = hidden.shape[1]
    full_mask = np.concatenate([np.ones((b, p), dtype=bool), mask.astype(bool)], axis=1)
    with no_grad():
        if isinstance(model, GPT2):
            tr = model.transformer
            x = tr.wte(ids) + tr.wpe(np.arange(p, p + t))  # the text at positions P…P+T−1
            keys = full_mask[:, None, None, :] & np.tril(np.ones((p + t, p + t), bool))
            for i, block in enumerate(tr.h):
                virt = Tensor(np.broadcast_to(hidden[i], (b, p, hidden.shape[2])).copy())
                x = block(ops.concat([virt, x], axis=1), keys)[:, p:]
            x = tr.ln_f(x)
            return x.data @ tr.wte.weight.data.T  # (B, T, V)
        x = model.embeddings(ids)  # the text at positions 0…T−1
        keys = full_mask[:, None, None, :]
        for i, layer in enumerate(model.encoder.layer):
            virt = Tensor(np.broadcast_to(hidden[i], (b, p, hidden.shape[2])).copy())
            x = layer(ops.concat([virt, x], axis=1), keys)[:, p:]
        return x.data


@equation(
    "prefix.layer_fold",
    what="PreLayer (hidden P_l replaced at each layer) = KV prefix W_k·g(P_l), W_v·g(P_l)",
    derivation="adapters_prompts.md",
    implements=PrefixLayer.key_values,
    tol=1e-12,
)
def _check_prefix_layer_fold() -> Outcome:
    ids = np.array([[1, 5, 7, 2], [3, 3, 9, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    errs, arrays = [], {"ids": ids, "mask": mask}
    with backend.dtype_policy("float64"):
        backend.seed(63)
        for name, model in (("gpt2", _tiny_gpt2()), ("bert", _tiny_bert())):
            layer = PrefixLayer(model, 3, std=0.5)
            pm = PromptedModel(model, layer)
            with no_grad():
                out = pm(ids, mask).data
            ref = _literal_prelayer(model, layer.hidden.data, ids, mask)
            real = mask.astype(bool)  # padded rows of BERT are not compared (meaningless)
            errs.append(rel_error(out[real], ref[real], atol=1e-10))
            arrays[f"{name}_hidden"], arrays[f"{name}_out"] = layer.hidden.data, ref
    return Outcome(error=max(errs), arrays=arrays)


@equation(
    "prompt.grad",
    what="X = [E_p; E(ids)], Ē_p = Σ_b X̄_b[:P] (through GPT-2, vs finite differences)",
    derivation="adapters_prompts.md",
    implements=prepend_prompt,
    tol=1e-6,
)
def _check_prompt_grad() -> Outcome:
    ids = np.array([[1, 5, 7, 2], [3, 3, 9, 4]])
    with backend.dtype_policy("float64"):
        backend.seed(64)
        model = _tiny_gpt2()
        pt = PromptTuning(model, 2, std=0.5)
        pm = PromptedModel(model, pt)
        soft = pt.prompt.data.copy()

        def loss(e: Tensor) -> Tensor:
            emb = model.transformer.wte(ids)
            x = prepend_prompt(e, emb)
            labels = np.concatenate([np.full((2, 2), -100), ids], axis=1)
            return model.loss(None, labels, inputs_embeds=x)

        fd = numerical_grad(loss, [soft], 0, eps=1e-4)  # truncation O(ε²) ≈ 1e-8
        pm.zero_grad()
        pm.loss(ids).backward()
        # the same gradient through PromptedModel as through the bare formula
        e = Tensor(soft.copy(), requires_grad=True)
        loss(e).backward()
        same = rel_error(pt.prompt.grad, e.grad)
        # entries ≪ max|Ē_p| carry the loss's rounding u·L/ε: floor at 10⁻³·max|Ē_p|
        fd_err = rel_error(e.grad, fd, atol=1e-3 * float(np.abs(fd).max()))
    return Outcome(error=max(fd_err, same), arrays={"ids": ids, "prompt": soft,
                                                               "grad_prompt": e.grad})  # fmt: skip
