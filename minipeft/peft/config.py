"""Adapter configurations with HF PEFT's field names, so ``adapter_config.json`` ports as is.

Only the fields minipeft implements are accepted with non-default values; an HF PEFT field
that would change the result and that minipeft does not implement (``layers_to_transform``,
``modules_to_save``, ``lora_bias``, …) raises ``ValueError`` naming it, instead of being
silently ignored.

Every field is checked when a config is built: a wrong type raises ``TypeError`` (``r=True``,
``r=8.0``), a value out of range or not finite raises ``ValueError`` (``lora_alpha=NaN``,
``lora_dropout=1.0``) — so a bad ``adapter_config.json`` fails on load, not as NaN logits.

Module-name patterns (``target_modules`` as a string, the keys of ``rank_pattern``) are
regular expressions run by RE2 (``google-re2``), which matches in time linear in the name
whatever the pattern: a pattern like ``(.*.*)*!`` that makes Python's backtracking ``re``
run for ever returns at once. RE2 has no backreferences or lookaround; such a pattern is
refused when the config is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import re2

from ..nn.module import Module

__all__ = [
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "VeraConfig",
    "check_adapter_name",
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


# ------------------------------------------------------------------------------ adapter names
_NAME_MAX = 100
# attributes of the module that holds one child per adapter (``lora_A.<name>``): an adapter
# named like one of them would shadow it (``training``, ``forward``, ``keys``, …)
_RESERVED_NAMES = frozenset(n for n in dir(Module) if not n.startswith("_")) | {"training", "keys"}


def check_adapter_name(adapter_name: Any) -> str:
    """The one rule for adapter names, for every tuner; returns the name or raises.

    A name is 1 to 100 characters, letters, digits, ``_`` and ``-``, starting with a letter
    or digit. That excludes dots (the name is one component of a tensor key such as
    ``lora_A.<name>.weight``), path separators, ``..`` and absolute paths (``save_pretrained``
    writes adapter ``<name>`` to ``<directory>/<name>`` and must never leave the directory),
    and the names of module attributes (``training``, ``forward``) the name would shadow.
    """
    if not isinstance(adapter_name, str):
        raise TypeError(
            f"adapter_name: expected a string, got {adapter_name!r} ({type(adapter_name).__name__})"
        )
    ok = (
        0 < len(adapter_name) <= _NAME_MAX
        and adapter_name[0].isalnum()
        and all(c.isalnum() or c in "_-" for c in adapter_name)
        and adapter_name.isprintable()
    )
    if not ok:
        raise ValueError(
            f"adapter_name: expected 1 to {_NAME_MAX} letters, digits, '_' or '-' starting "
            f"with a letter or digit (no dots, path separators or spaces), got {adapter_name!r}"
        )
    if adapter_name in _RESERVED_NAMES:
        raise ValueError(
            f"adapter_name: {adapter_name!r} is the name of a module attribute it would "
            f"shadow; choose another name"
        )
    return adapter_name


# ------------------------------------------------------------------------------ matching
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is raised with the field's name instead


@functools.lru_cache(maxsize=512)
def _compile(pattern: str) -> Any:
    return re2.compile(pattern, _RE2_OPTIONS)


def compile_pattern(pattern: str, field_name: str = "target_modules") -> Any:
    """``pattern`` compiled by RE2 (linear-time matching); ValueError names ``field_name``."""
    try:
        return _compile(pattern)
    except re2.error as exc:
        why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"{field_name}: {pattern!r} is not a pattern RE2 can run ({why}); minipeft matches "
            f"module names with RE2, in linear time, which has no backreferences or "
            f"lookaround — rewrite the pattern or give a list of module names"
        ) from None


def target_matches(target_modules: str | list[str] | None, name: str) -> bool:
    """HF PEFT's rule: a string is a regex that must match the whole module name
    (``re.fullmatch``, run by RE2); a list matches a name equal to an entry or ending in
    ``.<entry>``."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return compile_pattern(target_modules).fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _pattern_key_regex(key: str, field_name: str) -> Any:
    return compile_pattern(rf"(.*\.)?({key})$", f"{field_name}[{key!r}]")


def get_pattern_key(pattern_keys: list[str], name: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` matching ``name`` as HF PEFT does:
    ``re.match(rf"(.*\\.)?({key})$", name)`` (run by RE2); None when no key matches."""
    for key in pattern_keys:
        if _pattern_key_regex(key, "rank_pattern/alpha_pattern").match(name):
            return key
    return None


# ------------------------------------------------------------------------------ field checks
def check_int(field_name: str, value: Any, minimum: int) -> int:
    """An integer ≥ ``minimum`` (bool refused: ``r=True`` is not a rank)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{field_name}: expected an integer ≥ {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{field_name}: expected an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_real(
    field_name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval given (bool refused; NaN and ±inf refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"{field_name}: expected a real number, got {value!r} ({type(value).__name__})"
        )
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{field_name}: expected a finite number{where}, got {value!r}")
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        raise ValueError(f"{field_name}: expected a number{where}, got {value!r}")
    return v


def check_bool(field_name: str, value: Any) -> bool:
    """True or False (JSON's true/false), not 0, 1 or a string."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{field_name}: expected true or false, got {value!r}")
    return bool(value)


def _check_modules(field_name: str, value: Any, *, required: bool) -> list[str] | str | None:
    """A regex string (run by RE2) or a list of module names; None only if not ``required``."""
    if value is None or (not isinstance(value, str) and hasattr(value, "__len__") and not value):
        if required:
            raise ValueError(f"{field_name}: expected a list of names or a regex string, got none")
        return None
    if isinstance(value, str):
        compile_pattern(value, field_name)
        return value
    if isinstance(value, dict) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"{field_name}: expected a list of names or a regex string, got {type(value).__name__}"
        )
    names = list(value)
    for n in names:
        if not isinstance(n, str) or not n:
            raise TypeError(f"{field_name}: expected non-empty strings, got {n!r} in {names!r}")
    return names


@dataclass
class PeftConfig:
    """Fields shared by every adapter type."""

    peft_type: ClassVar[str] = ""
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.target_modules = _check_modules("target_modules", self.target_modules, required=True)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra: expected a dict, got {type(self.extra).__name__}")

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
        check_int("r", self.r, 1)
        # HF PEFT accepts any α; minipeft refuses α ≤ 0 (0 switches the adapter off, a
        # negative α flips the sign of the update: both are mistakes, not settings)
        check_real("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_real("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        check_bool("use_rslora", self.use_rslora)
        check_bool("use_dora", self.use_dora)
        init = self.init_lora_weights
        if not isinstance(init, bool) and str(init).lower() not in _LORA_INITS:
            raise ValueError(
                f"init_lora_weights: expected true, false or one of {_LORA_INITS}, got {init!r}"
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias: expected 'none', 'all' or 'lora_only', got {self.bias!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(
                    f"{name}: expected a dict of pattern → value, got "
                    f"{type(getattr(self, name)).__name__}"
                )
        for k, v in self.rank_pattern.items():
            _pattern_key_regex(str(k), "rank_pattern")
            check_int(f"rank_pattern[{k!r}]", v, 1)
        for k, v in self.alpha_pattern.items():
            _pattern_key_regex(str(k), "alpha_pattern")
            check_real(f"alpha_pattern[{k!r}]", v, low=0.0, low_open=True)

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
        check_int("r", self.r, 1)
        # a seed for NumPy's generator (and torch's, when regenerating HF PEFT's projections)
        check_int("projection_prng_key", self.projection_prng_key, 0)
        check_bool("save_projection", self.save_projection)
        check_real("vera_dropout", self.vera_dropout, low=0.0, high=1.0, high_open=True)
        check_real("d_initial", self.d_initial)
        check_bool("init_weights", self.init_weights)
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
        ff = _check_modules("feedforward_modules", self.feedforward_modules, required=False)
        self.feedforward_modules = ff
        check_bool("init_ia3_weights", self.init_ia3_weights)
        if isinstance(ff, list) and isinstance(self.target_modules, list):
            extra = sorted(set(ff) - set(self.target_modules))
            if extra:  # HF PEFT raises here too
                raise ValueError(
                    f"feedforward_modules: expected a subset of target_modules "
                    f"{self.target_modules}, got {extra} outside it"
                )


_LORA_INITS = ("true", "false", "kaiming", "gaussian", "lecture", "pissa", "olora")
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
