"""Wrap the target modules of a model with adapters, freeze the rest (as HF PEFT does).

``get_peft_model(model, config)`` returns a ``PeftModel`` whose module tree reads like HF
PEFT's — ``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight`` — so that
adapter files map onto it by dropping the adapter name. Matching follows HF PEFT
(``config.target_matches``): a list of suffixes, or a regex string matched in full.
Only layers with a 2-D weight (``Linear`` (out, in) and GPT-2's ``Conv1D`` (in, out)) are
wrapped; a target that names anything else raises ValueError.

Adding an adapter is all or nothing: the name, the config and every target are checked
before the model is touched, and if building the adapter still fails part-way, every
replaced layer, frozen flag and rewritten weight is put back before the error propagates.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from ..nn.layers import Embedding
from ..nn.module import Module
from .adalora import AdaLoraConfig, RankAllocator, SVDLinear, orthogonal_penalty
from .config import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    VeraConfig,
    check_adapter_name,
    check_int,
    target_matches,
)
from .ia3 import IA3Layer
from .lora import LoraLayer, _AdapterDict, base_layout
from .vera import VeraLayer, vera_kaiming_projection

__all__ = ["PeftModel", "UnknownAdapterError", "count_parameters", "get_peft_model"]

_ADAPTER_LAYERS = (LoraLayer, VeraLayer, IA3Layer, SVDLinear)
_CONFIGS = (LoraConfig, VeraConfig, IA3Config, AdaLoraConfig)


class UnknownAdapterError(KeyError, ValueError):
    """No adapter of that name: a failed lookup (KeyError) and, as HF PEFT raises, a ValueError."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def _warn_rank_above_layer(model: Module, config: PeftConfig, targets: list[str]) -> None:
    """Warn when a rank exceeds min(in, out) of its layer (LoRA's r, AdaLoRA's init_r).

    HF PEFT accepts such a rank silently (only PiSSA/OLoRA refuse it, as minipeft does):
    ΔW = s·B·A is (out, in), so its rank is at most min(in, out) and the extra rank only
    adds parameters. minipeft accepts it too, and says so.
    """
    if not isinstance(config, LoraConfig | AdaLoraConfig):
        return
    for tname in targets:
        mod = model.get_submodule(tname)
        if isinstance(mod, LoraLayer):
            fi, fo = mod.in_features, mod.out_features
        else:
            fi, fo, _ = base_layout(mod, allow_4bit=True)
        r = config.rank_and_alpha(tname)[0] if isinstance(config, LoraConfig) else config.init_r
        if r > min(fi, fo):
            field = "r" if isinstance(config, LoraConfig) else "init_r"
            warnings.warn(
                f"{field}: rank {r} exceeds min(in, out) = {min(fi, fo)} of {tname!r}; the "
                f"update's rank is at most {min(fi, fo)}, so the extra rank only adds "
                f"parameters (HF PEFT accepts this silently)",
                UserWarning,
                stacklevel=4,
            )


def _discard_lora(layer: LoraLayer, name: str) -> None:
    """Remove every trace of adapter ``name`` from ``layer``, even a half-built one."""
    for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        if name in store:
            del store[name]
    for d in (layer.r, layer.lora_alpha, layer.scaling, layer.lora_dropout, layer.use_dora):
        d.pop(name, None)
    layer.active_adapters = [a for a in layer.active_adapters if a != name]


def _replace(root: Module, name: str, new: Module) -> None:
    """Put ``new`` at dotted ``name`` in ``root``, keeping the parent's child order."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    parent._modules[child] = new
    object.__setattr__(parent, child, new)


def _targets(model: Module, config: PeftConfig) -> list[str]:
    names = []
    inside: list[str] = []  # adapter layers seen: their inner modules are never targets
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, _ADAPTER_LAYERS):
            inside.append(name)
        if not name or not target_matches(config.target_modules, name):
            continue
        if isinstance(mod, _ADAPTER_LAYERS):
            if isinstance(mod, LoraLayer) and isinstance(config, LoraConfig):
                names.append(name)  # a further LoRA adapter on an already wrapped layer
                continue
            raise ValueError(f"target_modules: {name!r} already carries an adapter")
        w = getattr(mod, "weight", None)
        # an Embedding's (vocab, C) table is 2-D too, but it is looked up, not multiplied
        if w is None or getattr(w, "ndim", 0) != 2 or isinstance(mod, Embedding):
            raise ValueError(
                f"target_modules: {name!r} is a {type(mod).__name__}; only layers with a 2-D "
                f"weight (Linear, Conv1D) can be adapted"
            )
        base_layout(mod, allow_4bit=isinstance(config, LoraConfig))  # raises for a 4-bit IA3 …
        names.append(name)
    if not names:
        raise ValueError(
            f"target_modules: {config.target_modules!r} matched no module of the model"
        )
    return names


class _TunerModel(Module):
    """HF PEFT's ``LoraModel``/``VeraModel``/``IA3Model`` level: holds ``model`` (+ VeRA's A, B)."""

    def __init__(self, model: Module) -> None:
        super().__init__()
        self.model = model


class PeftModel(Module):
    """A model with adapters. Call it like the model; ``save_pretrained`` writes HF PEFT files."""

    def __init__(self, model: Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = _TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    # ---------------------------------------------------------------- building
    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add adapter ``adapter_name`` (LoRA adapters may coexist; one VeRA/IA3/AdaLoRA adapter).

        All or nothing: on any error the model is left exactly as it was.
        """
        check_adapter_name(adapter_name)
        if not isinstance(config, _CONFIGS):
            raise TypeError(
                "config: expected a LoraConfig, VeraConfig, IA3Config or AdaLoraConfig, "
                f"got {type(config).__name__}"
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name: {adapter_name!r} already exists")
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if not (isinstance(config, LoraConfig) and isinstance(first, LoraConfig)):
                raise ValueError(
                    "config: only LoRA adapters can be added next to an existing adapter"
                )
        model = self.base_model.model
        targets = _targets(model, config)  # every check that needs the model; changes nothing
        _warn_rank_above_layer(model, config, targets)
        with self._all_or_nothing(adapter_name, config, targets):
            if isinstance(config, LoraConfig):
                self._inject_lora(model, config, adapter_name, targets)
            elif isinstance(config, VeraConfig):
                self._inject_vera(model, config, adapter_name, targets)
            elif isinstance(config, IA3Config):
                self._inject_ia3(model, config, adapter_name, targets)
            else:
                self._inject_adalora(model, config, adapter_name, targets)
            self.peft_config[adapter_name] = config
            self._activate(adapter_name if len(self.peft_config) == 1 else self.active_adapter)

    @contextmanager
    def _all_or_nothing(self, name: str, config: PeftConfig, targets: list[str]) -> Iterator[None]:
        """Run an injection; on error put back layers, flags, W₀ and the wrapper's state."""
        model = self.base_model.model
        layers = {t: model.get_submodule(t) for t in targets}
        flags = [(p, p.requires_grad) for p in self.parameters()]
        init = str(getattr(config, "init_lora_weights", "")).lower()
        weights = {  # PiSSA/OLoRA rewrite W₀ in place; nothing else does
            t: m.weight.data.copy()
            for t, m in layers.items()
            if init in ("pissa", "olora") and not getattr(m, "is_4bit", False)
        }
        state = {k: self.__dict__.get(k) for k in ("active_adapter", "rankallocator")}
        tuner = {k: self.base_model.__dict__.get(k) for k in ("vera_A", "vera_B")}
        try:
            yield
        except BaseException:
            for t, original in layers.items():
                if model.get_submodule(t) is not original:
                    _replace(model, t, original)
                elif isinstance(original, LoraLayer):
                    _discard_lora(original, name)
            for t, w in weights.items():
                layers[t].weight.data[...] = w
            for p, flag in flags:
                p.requires_grad_(flag)
            self.peft_config.pop(name, None)
            for k, v in state.items():
                if v is None:
                    self.__dict__.pop(k, None)
                else:
                    object.__setattr__(self, k, v)
            for k, v in tuner.items():
                if v is None and k in self.base_model.__dict__:
                    delattr(self.base_model, k)
            raise

    def _inject_lora(
        self, model: Module, config: LoraConfig, name: str, targets: list[str]
    ) -> None:
        for tname in targets:
            mod = model.get_submodule(tname)
            r, alpha = config.rank_and_alpha(tname)
            if isinstance(mod, LoraLayer):  # a further adapter on a wrapped layer
                layer = mod
            else:
                layer = LoraLayer(mod, fan_in_fan_out=config.fan_in_fan_out)
                _replace(model, tname, layer)
            layer.add_adapter(
                name,
                r,
                alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                use_dora=config.use_dora,
                init_lora_weights=config.init_lora_weights,
                activate=False,
            )

    def _inject_vera(
        self, model: Module, config: VeraConfig, name: str, targets: list[str]
    ) -> None:
        out_max = in_max = 0
        for tname in targets:
            fi, fo, _ = base_layout(model.get_submodule(tname))
            in_max, out_max = max(in_max, fi), max(out_max, fo)
        rng = np.random.default_rng(config.projection_prng_key)
        dt = model.get_submodule(targets[0]).weight.dtype
        a = vera_kaiming_projection((config.r, in_max), rng).astype(dt)  # A (r, in_max)
        b = vera_kaiming_projection((out_max, config.r), rng).astype(dt)  # B (out_max, r)
        self.base_model.vera_A = _AdapterDict()
        self.base_model.vera_B = _AdapterDict()
        self.base_model.vera_A.register_buffer(name, a, persistent=config.save_projection)
        self.base_model.vera_B.register_buffer(name, b, persistent=config.save_projection)
        shared = _SharedProjection(self.base_model, name)
        for tname in targets:
            layer = VeraLayer(
                model.get_submodule(tname),
                name,
                shared,
                r=config.r,
                d_initial=config.d_initial,
                vera_dropout=config.vera_dropout,
                fan_in_fan_out=config.fan_in_fan_out,
                init_weights=config.init_weights,
            )
            _replace(model, tname, layer)

    def _inject_ia3(self, model: Module, config: IA3Config, name: str, targets: list[str]) -> None:
        for tname in targets:
            ff = target_matches(config.feedforward_modules, tname)
            layer = IA3Layer(
                model.get_submodule(tname),
                name,
                is_feedforward=ff,
                fan_in_fan_out=config.fan_in_fan_out,
                init_ia3_weights=config.init_ia3_weights,
            )
            _replace(model, tname, layer)

    def _inject_adalora(
        self, model: Module, config: AdaLoraConfig, name: str, targets: list[str]
    ) -> None:
        layers = {}
        for tname in targets:
            layer = SVDLinear(
                model.get_submodule(tname), r=config.init_r, lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout, adapter_name=name,
            )  # fmt: skip
            _replace(model, tname, layer)
            layers[tname] = layer
        self.rankallocator = RankAllocator(layers, config)

    # ---------------------------------------------------------------- AdaLoRA
    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA: update importance and mask to the budget; call after the optimizer step.

        ``global_step`` is an integer ≥ 0 (-1 or 2.5 would corrupt the rank pattern).
        """
        cfg = self.peft_config[self.active_adapter]
        if not isinstance(cfg, AdaLoraConfig):
            raise TypeError(f"update_and_allocate: adapter {self.active_adapter!r} is not AdaLoRA")
        check_int("global_step", global_step, 0)
        _, pattern = self.rankallocator.update_and_allocate(global_step)
        if pattern is not None:
            cfg.rank_pattern = {f"{n}.lora_E": keep for n, keep in pattern.items()}

    def orthogonal_regularization(self) -> Any:
        """AdaLoRA: orth_reg_weight · R(P, Q) (a Tensor to add to the loss)."""
        cfg = self.peft_config[self.active_adapter]
        if not isinstance(cfg, AdaLoraConfig):
            raise TypeError(f"orthogonal_regularization: {self.active_adapter!r} is not AdaLoRA")
        layers = [m for _, m in self.adapter_layers() if isinstance(m, SVDLinear)]
        penalty = orthogonal_penalty([m.A for m in layers], [m.B for m in layers])
        return penalty * cfg.orth_reg_weight

    # ---------------------------------------------------------------- adapters
    def adapter_layers(self) -> Iterator[tuple[str, Module]]:
        """(name in the model, layer) for every adapter-carrying layer."""
        for n, m in self.base_model.model.named_modules():
            if isinstance(m, _ADAPTER_LAYERS):
                yield n, m

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise UnknownAdapterError(
                f"adapter_name: no adapter {adapter_name!r}; have {list(self.peft_config)}"
            )

    def set_adapter(self, adapter_name: str) -> None:
        """Activate ``adapter_name``; freeze every parameter that is not part of it.

        Trainable: the active adapter's tensors, plus biases when the LoRA config says
        ``bias="all"`` (every bias) or ``"lora_only"`` (biases of adapted layers).
        As HF PEFT does, merged adapters are unmerged first, with a warning: a merged
        layer runs its (merged) base weight alone, so it would go on giving the merged
        adapter's output whatever adapter is active.
        """
        self._check_known(adapter_name)
        merged = [n for n, layer in self.adapter_layers() if layer.merged]
        if merged:
            warnings.warn(
                f"set_adapter: adapters are merged into {len(merged)} layers "
                f"({merged[0]!r}, …); unmerging them first, as HF PEFT does",
                UserWarning,
                stacklevel=2,
            )
            self.unmerge_adapter()
        self._activate(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete adapter ``adapter_name`` and its tensors (HF PEFT's ``delete_adapter``).

        As in HF PEFT: an unknown name or a merged adapter raises ValueError; deleting the
        active adapter activates the first remaining one (sorted by name), with a warning.
        Unlike HF PEFT, the last adapter cannot be deleted (a PeftModel always has an
        active adapter): use ``get_base_model()`` or ``merge_and_unload()`` instead.
        """
        self._check_known(adapter_name)
        if len(self.peft_config) == 1:
            raise ValueError(
                f"adapter_name: {adapter_name!r} is the only adapter; a PeftModel keeps one "
                f"(use get_base_model() or merge_and_unload() to drop it)"
            )
        merged = [
            n for n, layer in self.adapter_layers()
            if adapter_name in getattr(layer, "merged_adapters", [])
        ]  # fmt: skip
        if merged:
            raise ValueError(
                f"adapter_name: {adapter_name!r} is merged into {merged[0]!r}"
                f"{' and others' if len(merged) > 1 else ''}; unmerge it first"
            )
        # only LoRA adapters coexist (add_adapter), so only LoRA layers hold several
        for _, layer in self.adapter_layers():
            if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name == self.active_adapter:
            new = sorted(self.peft_config)[0]
            warnings.warn(
                f"delete_adapter: {adapter_name!r} was the active adapter; activating {new!r}",
                UserWarning,
                stacklevel=2,
            )
            self._activate(new)

    def _activate(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter and set the trainable flags (no checks)."""
        self.active_adapter = adapter_name
        self.base_model.model.requires_grad_(False)
        for _, layer in self.adapter_layers():
            if isinstance(layer, LoraLayer):
                if adapter_name in layer.r:
                    layer.set_adapter(adapter_name)
                else:
                    layer.active_adapters = []
            else:
                for p in layer.parameters():
                    if p is not getattr(layer.base_layer, "weight", None) and p is not getattr(
                        layer.base_layer, "bias", None
                    ):
                        p.requires_grad_(True)
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        if bias == "all":
            for n, p in self.base_model.model.named_parameters():
                if n.rsplit(".", 1)[-1] == "bias":
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in self.adapter_layers():
                b = getattr(layer.base_layer, "bias", None)
                if b is not None:
                    b.requires_grad_(True)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the base model alone."""
        with ExitStack() as stack:
            for _, layer in self.adapter_layers():
                stack.enter_context(layer.disable_adapters())
            yield

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (undo with ``unmerge_adapter``)."""
        for _, layer in self.adapter_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self) -> Module:
        """Merge the active adapter and return the plain base model (adapters removed)."""
        model = self.base_model.model
        for name, layer in list(self.adapter_layers()):
            layer.merge()
            _replace(model, name, layer.base_layer)
        return model

    def get_base_model(self) -> Module:
        return self.base_model.model

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the base model (``model.loss(...)``)."""
        base = self.__dict__.get("base_model")
        if name.startswith("_") or base is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(base.model, name)

    # ---------------------------------------------------------------- running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)

    # ---------------------------------------------------------------- counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, HF PEFT's definition (adapters included)."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> str:
        """Print (and return) the line HF PEFT prints."""
        trainable, total = self.get_nb_trainable_parameters()
        line = (
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )
        print(line)
        return line

    # ---------------------------------------------------------------- files
    def save_pretrained(
        self, save_directory: str, selected_adapters: list[str] | None = None
    ) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as HF PEFT does.

        As in HF PEFT, the adapter named "default" goes into ``save_directory`` itself and
        any other adapter into ``save_directory/<name>``.
        """
        from pathlib import Path

        from .io import save_adapter

        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:  # all checked before anything is written
            self._check_known(name)
            check_adapter_name(name)  # never a path out of save_directory
        for name in names:
            out = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter(self, out, name)

    def load_adapter(self, model_id: str, adapter_name: str) -> None:
        """Add adapter ``adapter_name`` from an adapter directory (HF PEFT's ``load_adapter``)."""
        from .io import add_adapter_from_dir

        add_adapter_from_dir(self, model_id, adapter_name)

    @classmethod
    def from_pretrained(
        cls, model: Module, model_id: str, adapter_name: str = "default"
    ) -> PeftModel:
        """Load an adapter directory written by HF PEFT (or minipeft) onto ``model``."""
        from .io import load_adapter

        return load_adapter(model, model_id, adapter_name)


class _SharedProjection(dict):
    """{"A": …, "B": …} read live from the tuner model's buffers (VeRA's shared projections)."""

    def __init__(self, tuner: Module, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_tuner", tuner)
        object.__setattr__(self, "_name", name)

    def __getitem__(self, key: str) -> Any:
        holder = self._tuner.vera_A if key == "A" else self._tuner.vera_B
        return getattr(holder, self._name)


def count_parameters(model: Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters."""
    trainable = total = 0
    for p in model.parameters():
        total += p.size
        trainable += p.size if p.requires_grad else 0
    return trainable, total


def get_peft_model(model: Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``config.target_modules`` of ``model`` with adapters; freeze everything else."""
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a minipeft Module, got {type(model).__name__}")
    return PeftModel(model, config, adapter_name)
