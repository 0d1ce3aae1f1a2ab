"""The unified view h = f_θ₀(x) + Δf_φ(x) (lecture §3.5; He et al., 2022) as a computed table.

Every row is built by applying minipeft's implementation of the method to real models:

* trainable — parameters that require a gradient after the method is applied to
  all-MiniLM-L6-v2's architecture (C = 384, L = 6; the task head is not counted); for
  prefix tuning also the numbers kept after the MLP is folded away ("stored");
* mergeable — whether the trained Δf can be folded into the base weights, CHECKED: the
  merged model must be a plain base model (same modules) whose outputs equal the adapted
  one's (max |Δ| < 1e-5 in float32). LoRA (``merge_and_unload``) and BitFit (new biases)
  pass; adapters, prefixes and prompts have no such merge (their Δf is non-linear in x or
  lengthens the sequence);
* latency — forward time of minipeft's GPT-2 (a small config) with the method, divided by
  the base model's, on one BLAS thread: median of the ratios of interleaved pairs
  (base, method); a reparametrized prefix is folded first (inference has no MLP). On a
  busy machine the ratios are noisy: take final figures on a quiet one.

``unified_table()`` returns the rows; ``format_table`` prints them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import no_grad
from ..nn.module import Module

__all__ = ["Method", "Row", "default_methods", "format_table", "minilm_config", "unified_table"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A named way to adapt a model.

    ``apply(model)`` → (forward callable, adapted module, merge function or None).
    """

    name: str
    delta_f: str  # Δf's form, in the derivation's notation
    apply: Callable[[Module], tuple[Callable[[Any], Any], Module, Callable[[], Module] | None]]


@dataclasses.dataclass
class Row:
    method: str
    delta_f: str
    trainable: int
    stored: int
    fraction: float  # trainable / base parameters
    mergeable: bool
    latency_ratio: float


def minilm_config() -> Any:
    """all-MiniLM-L6-v2's BertConfig (from the installed package; its published sizes otherwise)."""
    from ..models.bert import BertConfig, default_model_dir

    try:
        return BertConfig.from_json_file(default_model_dir() / "config.json")
    except FileNotFoundError:
        return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                          num_attention_heads=12, intermediate_size=1536)  # fmt: skip


def _is_bert(model: Module) -> bool:
    from ..models.bert import BertModel

    return isinstance(model, BertModel)


def default_methods(
    r_lora: int = 8, r_houlsby: int = 8, r_pfeiffer: int = 16, n_prefix: int = 16,
    n_prelayer: int = 32, n_prompt: int = 20, reparam_hidden: int = 64,
) -> list[Method]:  # fmt: skip
    """The methods of notebook 07 at similar budgets (≈ 74k–78k trainable on MiniLM)."""
    from .adapters import add_adapters
    from .config import LoraConfig
    from .ia3 import apply_bitfit
    from .inject import get_peft_model
    from .prompts import PrefixLayer, PrefixTuning, PromptedModel, PromptTuning, PTuningV2

    def call(m: Module) -> Callable[[Any], Any]:
        return lambda ids: m(ids)

    def lora(model: Module) -> Any:
        targets = ["query", "value"] if _is_bert(model) else ["c_attn"]
        cfg = LoraConfig(
            r=r_lora, lora_alpha=2 * r_lora, target_modules=targets,
            fan_in_fan_out=not _is_bert(model), init_lora_weights="gaussian",
        )  # fmt: skip
        pm = get_peft_model(model, cfg)
        # a trained-looking B (the default B = 0 would make the merge check vacuous)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.data[...] = backend.rng().normal(0, 0.02, p.shape).astype(p.dtype)
        return call(pm), pm, pm.merge_and_unload

    def bitfit(model: Module) -> Any:
        apply_bitfit(model)
        return call(model), model, lambda: model

    def adapters(kind: str, r: int) -> Any:
        def f(model: Module) -> Any:
            add_adapters(model, kind, r, init="houlsby")
            return call(model), model, None

        return f

    def prompt(factory: Callable[[Module], Module]) -> Any:
        def f(model: Module) -> Any:
            pm = PromptedModel(model, factory(model))
            return call(pm), pm, None

        return f

    def full(model: Module) -> Any:
        return call(model), model, lambda: model

    return [
        Method("full fine-tuning", "ΔW for every weight (W₀ + ΔW)", full),
        Method(f"LoRA r={r_lora} (q, v)", "s·B·A·x on W_q, W_v", lora),
        Method(f"Houlsby adapters r={r_houlsby}",
               "W_up·f(W_down·h) after attention and FFN", adapters("houlsby", r_houlsby)),
        Method(f"Pfeiffer adapter r={r_pfeiffer}",
               "W_up·f(W_down·h) after FFN", adapters("pfeiffer", r_pfeiffer)),
        Method(f"prefix tuning P={n_prefix} (MLP {reparam_hidden})",
               "λ(q)·(Attn(q,P_k,P_v) − h) per layer",
               prompt(lambda m: PrefixTuning(m, n_prefix, reparam_hidden=reparam_hidden))),
        Method(f"P-tuning v2 P={n_prefix}", "λ(q)·(Attn(q,P_k,P_v) − h) per layer",
               prompt(lambda m: PTuningV2(m, n_prefix))),
        Method(f"PreLayer P={n_prelayer}", "same, P_k,v = W_k,v·g(P_l) (tied)",
               prompt(lambda m: PrefixLayer(m, n_prelayer))),
        Method(f"prompt tuning P={n_prompt}", "[E_p; E(x)] at the input only",
               prompt(lambda m: PromptTuning(m, n_prompt))),
        Method("BitFit", "Δb for every bias", bitfit),
    ]  # fmt: skip


def _stored(fwd_model: Module) -> int:
    from .prompts import PrefixTuning, PromptedModel

    if isinstance(fwd_model, PromptedModel) and isinstance(fwd_model.prompt, PrefixTuning):
        if fwd_model.prompt.reparam:
            s, p = fwd_model.spec, fwd_model.num_virtual_tokens
            return s.n_layer * 2 * p * s.hidden
    return sum(p.size for p in fwd_model.parameters() if p.requires_grad)


def _merge(fwd: Callable[[Any], Any], merge: Any, ids: Any) -> Module | None:
    """The merged plain model if the method merges with unchanged outputs, else None."""
    if merge is None:
        return None
    with no_grad():
        before = backend.to_numpy(fwd(ids).data).copy()
        merged = merge()
        plain = type(merged).__name__ in ("GPT2", "BertModel") and not any(
            "lora" in n or "adapter" in n for n, _ in merged.named_parameters()
        )
        after = backend.to_numpy(merged(ids).data)
    return merged if plain and np.abs(after - before).max() < 1e-5 else None


def _latency_ratio(base: Any, other: Any, ids: Any, repeats: int) -> float:
    ratios = []
    with no_grad():
        for f in (base, other, base, other):  # warm-up
            f(ids)
        for _ in range(repeats):
            t0 = time.perf_counter()
            base(ids)
            t1 = time.perf_counter()
            other(ids)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
    return float(np.median(ratios))


def unified_table(
    methods: list[Method] | None = None,
    *,
    gpt2_config: Any = None,
    batch: int = 4,
    seq_len: int = 128,
    repeats: int = 15,
    seed: int = 0,
) -> list[Row]:
    """Rows of the unified view: counts on MiniLM's architecture, latency on a small GPT-2."""
    from threadpoolctl import threadpool_limits

    from ..models.bert import BertModel
    from ..models.gpt2 import GPT2, GPT2Config

    methods = methods if methods is not None else default_methods()
    gcfg = gpt2_config or GPT2Config(
        vocab_size=512, n_positions=256, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    bcfg = minilm_config()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, gcfg.vocab_size, (batch, seq_len))
    rows = []
    with threadpool_limits(limits=1):
        backend.seed(seed)
        base_gpt2 = GPT2(gcfg).eval()
        state = base_gpt2.state_dict()

        def base(x: Any) -> Any:
            return base_gpt2(x)

        for m in methods:
            backend.seed(seed)
            bert = BertModel(bcfg, add_pooling_layer=False).eval()
            total = sum(p.size for p in bert.parameters())
            _, counted, _ = m.apply(bert)
            trainable = sum(p.size for p in counted.parameters() if p.requires_grad)
            stored = _stored(counted)
            backend.seed(seed)
            g = GPT2(gcfg).eval()
            g.load_state_dict(state)
            fwd, adapted, merge = m.apply(g)
            if hasattr(adapted, "fold"):  # inference runs without the prefix MLP
                adapted.fold()
            lat = _latency_ratio(base, fwd, ids, repeats)
            merged = _merge(fwd, merge, ids)
            ok = merged is not None
            rows.append(Row(m.name, m.delta_f, trainable, stored, trainable / total, ok, lat))
            if ok and merged is not adapted:  # LoRA: the merged model is a plain GPT-2
                lat = _latency_ratio(base, lambda x, p=merged: p(x), ids, repeats)
                rows.append(Row(m.name + ", merged", "none left (W₀ + s·B·A)", trainable, stored,
                                trainable / total, True, lat))  # fmt: skip
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    out = ["| method | Δf_φ(x) | trainable (MiniLM) | stored | % of base | mergeable | "
           "latency / base (GPT-2, 1 thread) |",
           "|---|---|---:|---:|---:|:-:|---:|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r.method} | {r.delta_f} | {r.trainable:,} | {r.stored:,} | "
            f"{100 * r.fraction:.3f} | {'yes' if r.mergeable else 'no'} | {r.latency_ratio:.2f} |"
        )
    return "\n".join(out)
