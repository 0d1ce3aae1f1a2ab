"""Adapter configurations with HF PEFT's field names, so ``adapter_config.json`` ports as is.

Only the fields minipeft implements are accepted with non-default values; an HF PEFT field
that would change the result and that minipeft does not implement (``layers_to_transform``,
``modules_to_save``, ``lora_bias``, …) raises ``ValueError`` naming it, instead of being
silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "VeraConfig",
    "config_from_dict",
    "get_pattern_key",
    "target_matches",
]

# HF PEFT fields that are harmless to read when they hold their default (None, False, {}, …).
_IGNORED_IF_DEFAULT = {
    "alora_invocation_tokens", "arrow_config", "corda_config", "eva_config", "kasa_config",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_bias",
    "lora_ga_config", "megatron_config", "modules_to_save", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
    "exclude_modules", "ensure_weight_tying",
}  # fmt: skip
# Informational HF PEFT fields (kept when read, never affect the result).
_INFORMATIONAL = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "peft_version",
    "inference_mode", "megatron_core", "qalora_group_size",
}  # fmt: skip


def target_matches(target_modules: str | list[str] | None, name: str) -> bool:
    """HF PEFT's rule: a string is a regex that must match the whole module name;
    a list matches a name equal to an entry or ending in ``.<entry>``."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def get_pattern_key(pattern_keys: list[str], name: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` matching ``name`` as HF PEFT does:
    ``re.match(rf"(.*\\.)?({key})$", name)``; None when no key matches."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass
class PeftConfig:
    """Fields shared by every adapter type."""

    peft_type: ClassVar[str] = ""
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.target_modules is None or (
            not isinstance(self.target_modules, str) and len(self.target_modules) == 0
        ):
            raise ValueError("target_modules: expected a list of names or a regex string, got none")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object HF PEFT writes (sorted keys; ``peft_type`` included)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d, "peft_type": self.peft_type}
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftConfig:
        """Build from an ``adapter_config.json`` object; unsupported options raise ValueError."""
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for k, v in d.items():
            if k == "peft_type":
                if v != cls.peft_type:
                    raise ValueError(f"peft_type: expected {cls.peft_type!r}, got {v!r}")
            elif k in own:
                kwargs[k] = v
            elif k in _INFORMATIONAL:
                extra[k] = v
            elif k in _IGNORED_IF_DEFAULT:
                if v not in (None, False, {}, [], "", "megatron.core"):
                    raise ValueError(f"{k}: minipeft does not support this option (got {v!r})")
            elif v not in (None, False, {}, []):
                # a field of a newer HF PEFT is harmless at its "off" value; anything else
                # would change the result in a way minipeft does not implement
                raise ValueError(f"{k}: unknown adapter_config.json field for {cls.peft_type}")
        cfg = cls(**kwargs)
        cfg.extra = extra
        return cfg


@dataclass
class LoraConfig(PeftConfig):
    """LoRA and its variants (rsLoRA, DoRA, PiSSA/OLoRA inits) — HF PEFT's ``LoraConfig``."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias: expected 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"lora_dropout: expected a probability in [0, 1), got {self.lora_dropout}"
            )
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"rank_pattern[{k!r}]: expected a positive integer, got {v!r}")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """(r, α) for module ``name``, honouring rank_pattern and alpha_pattern."""
        rk = get_pattern_key(list(self.rank_pattern), name)
        ak = get_pattern_key(list(self.alpha_pattern), name)
        r = self.rank_pattern[rk] if rk is not None else self.r
        alpha = self.alpha_pattern[ak] if ak is not None else self.lora_alpha
        return int(r), float(alpha)


@dataclass
class VeraConfig(PeftConfig):
    """VeRA — HF PEFT's ``VeraConfig`` (no α: the scale lives in the trained vectors)."""

    peft_type: ClassVar[str] = "VERA"
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if self.bias != "none":
            raise ValueError(f"bias: minipeft's VeRA supports only 'none', got {self.bias!r}")


@dataclass
class IA3Config(PeftConfig):
    """IA3 — HF PEFT's ``IA3Config``: feed-forward modules scale their input."""

    peft_type: ClassVar[str] = "IA3"
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, str):
            self.feedforward_modules = list(ff)


_TYPES: dict[str, type[PeftConfig]] = {"LORA": LoraConfig, "VERA": VeraConfig, "IA3": IA3Config}


def config_from_dict(d: dict[str, Any]) -> PeftConfig:
    """The config object for an ``adapter_config.json`` (dispatch on ``peft_type``)."""
    if "ADALORA" not in _TYPES:  # registered lazily: adalora.py imports this module
        from .adalora import AdaLoraConfig

        _TYPES["ADALORA"] = AdaLoraConfig
    t = d.get("peft_type")
    if t not in _TYPES:
        raise ValueError(f"peft_type: expected one of {sorted(_TYPES)}, got {t!r}")
    return _TYPES[t].from_dict(d)
