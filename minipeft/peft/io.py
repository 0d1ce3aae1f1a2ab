"""HF PEFT adapter files, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

HF PEFT stores the adapter tensors under the module names of the PEFT model with the
adapter name removed (``get_peft_model_state_dict``):

    base_model.model.<module>.lora_A.weight            (r, in)
    base_model.model.<module>.lora_B.weight            (out, r)
    base_model.model.<module>.lora_magnitude_vector    (out,)        DoRA
    base_model.model.<module>.vera_lambda_b            (out,)        VeRA
    base_model.model.<module>.vera_lambda_d            (r,)
    base_model.vera_A, base_model.vera_B               (r, in_max), (out_max, r)  if save_projection
    base_model.model.<module>.ia3_l                    (out, 1), or (1, in) for feed-forward
    base_model.model.<module>.lora_A / lora_E / lora_B  (r, in), (r, 1), (out, r)  AdaLoRA,
                                                       cut to the kept triplets of rank_pattern

minipeft's module tree has the same names with the adapter name inside
(``lora_A.default.weight``), so the mapping is a rename. Loading validates everything —
unknown keys, missing tensors, wrong shapes, unsupported options — before writing any
weight, and saving writes the directory atomically (``minipeft.io.atomic_directory``): a
crash leaves the complete old adapter or the complete new one, never new weights with an
old config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor
from ..io import atomic_directory
from ..models.io import (
    CheckpointError,
    load_safetensors,
    read_json,
    save_safetensors_atomic,
    write_json_atomic,
)
from ..nn.module import Module
from .adalora import AdaLoraConfig, SVDLinear
from .config import LoraConfig, PeftConfig, VeraConfig, config_from_dict
from .inject import PeftModel, _replace, get_peft_model

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_tensors",
    "add_adapter_from_dir",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# container name → does HF keep a trailing ".weight" after removing the adapter name?
_CONTAINERS = {
    "lora_A": True,
    "lora_B": True,
    "lora_magnitude_vector": False,
    "vera_lambda_b": False,
    "vera_lambda_d": False,
    "vera_A": False,
    "vera_B": False,
    "ia3_l": False,
    "lora_E": False,
}
_HF_INITS = (True, False, "gaussian", "pissa", "olora")


def _hf_key(name: str, adapter: str) -> str | None:
    """HF PEFT's file key for minipeft tensor ``name`` of ``adapter`` (None: not part of it)."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in _CONTAINERS and parts[i + 1] == adapter:
            keep_weight = _CONTAINERS[parts[i]]
            tail = parts[i + 2 :]
            if tail not in ([], ["weight"]):
                return None
            # AdaLoRA's lora_A/lora_B are bare parameters (tail []): no ".weight" either
            keep_weight = keep_weight and tail == ["weight"]
            return ".".join(parts[: i + 1] + (["weight"] if keep_weight else []))
    return None


def adapter_tensors(model: PeftModel, adapter: str) -> dict[str, Any]:
    """HF file key → the minipeft Tensor/array holding it, for ``adapter``."""
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        key = _hf_key(name, adapter)
        if key is not None:
            out[key] = p
    cfg = model.peft_config[adapter]
    if isinstance(cfg, VeraConfig) and cfg.save_projection:
        for which in ("vera_A", "vera_B"):
            holder = getattr(model.base_model, which)
            out[f"base_model.{which}"] = getattr(holder, adapter)
    return out


def save_adapter(model: PeftModel, save_directory: str | Path, adapter: str) -> Path:
    """Write ``adapter`` of ``model`` as HF PEFT does; returns the directory."""
    if adapter not in model.peft_config:
        raise KeyError(f"adapter: no adapter {adapter!r}; have {list(model.peft_config)}")
    cfg = model.peft_config[adapter]
    if getattr(cfg, "bias", "none") != "none":
        raise ValueError(
            f"bias: saving trained biases (bias={cfg.bias!r}) is not supported; use 'none'"
        )
    merged = [n for n, layer in model.adapter_layers() if getattr(layer, "merged", False)]
    if merged:
        raise ValueError(f"model: adapters are merged into {merged[:3]}; unmerge before saving")
    d = cfg.to_dict()
    if isinstance(cfg, LoraConfig):
        init = cfg.init_lora_weights
        if isinstance(init, str) and init.lower() in ("true", "kaiming"):
            init = True
        if init not in _HF_INITS:  # minipeft-only inits ("lecture"): weights are what count
            init = True
        d["init_lora_weights"] = init
    d.setdefault("base_model_name_or_path", None)
    d.setdefault("inference_mode", True)
    d.setdefault("task_type", None)
    tensors = {}
    for key, t in adapter_tensors(model, adapter).items():
        # saving is an explicit device → host copy: the file holds the same bytes
        arr = backend.to_numpy(t.data if isinstance(t, Tensor) else t)
        tensors[key] = np.ascontiguousarray(arr)
    if isinstance(cfg, AdaLoraConfig) and cfg.rank_pattern:
        tensors = _prune_adalora(tensors, cfg.rank_pattern)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:  # weights and config replaced together, never a mix
        save_safetensors_atomic(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json_atomic(tmp / CONFIG_NAME, d)
    return out


def _prune_adalora(
    tensors: dict[str, np.ndarray], rank_pattern: dict[str, list[bool]]
) -> dict[str, np.ndarray]:
    """AdaLoRA tensors cut to the kept triplets (PEFT: ``resize_state_dict_by_rank_pattern``)."""
    out = dict(tensors)
    for key_e, keep in rank_pattern.items():
        prefix = "base_model.model." + key_e.removesuffix(".lora_E")
        idx = np.asarray(keep, dtype=bool)
        for kind in ("lora_A", "lora_E", "lora_B"):
            key = f"{prefix}.{kind}"
            if key not in out:
                raise KeyError(f"rank_pattern: {key_e!r} names no adapted module ({key} missing)")
            out[key] = np.ascontiguousarray(out[key][:, idx] if kind == "lora_B" else out[key][idx])
    return out


def _vera_projections_from_torch(cfg: VeraConfig, in_max: int, out_max: int) -> tuple[Any, Any]:
    """Regenerate VeRA's projections as HF PEFT does (torch.Generator, ``_kaiming_init``)."""
    try:
        import torch
    except ImportError:
        raise ValueError(
            "save_projection: the adapter file holds no VeRA projections (save_projection=false) "
            "and regenerating them bit-exactly needs PyTorch's generator; install torch"
        ) from None
    import math

    gen = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)

    def kaiming(shape: tuple[int, int]) -> np.ndarray:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=gen).numpy()

    a = kaiming((cfg.r, in_max))
    return a, kaiming((out_max, cfg.r))


def read_adapter_config(directory: str | Path) -> PeftConfig:
    """The validated config of the adapter directory (unsupported options raise ValueError)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"directory: {d} is not a directory")
    path = d / CONFIG_NAME
    try:
        cfg = config_from_dict(read_json(path))
    except (TypeError, ValueError) as exc:
        if str(path) in str(exc):  # read_json's errors already name the file
            raise
        raise type(exc)(f"{path}: {exc}") from exc
    if getattr(cfg, "bias", "none") != "none":
        raise ValueError(f"bias: loading trained biases (bias={cfg.bias!r}) is not supported")
    if not (d / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{d / WEIGHTS_NAME}: no adapter weights file")
    return cfg


def _fill_adapter(pm: PeftModel, adapter: str, directory: Path, cfg: PeftConfig) -> None:
    """Validate the weights file against the adapter's tensors, then copy it in."""
    if isinstance(cfg, AdaLoraConfig) and cfg.rank_pattern:  # PEFT saves the kept triplets
        for key_e, keep in cfg.rank_pattern.items():
            layer = pm.base_model.model.get_submodule(key_e.removesuffix(".lora_E"))
            if not isinstance(layer, SVDLinear):
                raise CheckpointError(f"rank_pattern: {key_e!r} is not an AdaLoRA layer")
            layer.resize(keep)
    targets = adapter_tensors(pm, adapter)
    if isinstance(cfg, VeraConfig) and not cfg.save_projection:
        a = getattr(pm.base_model.vera_A, adapter)
        b = getattr(pm.base_model.vera_B, adapter)
        ta, tb = _vera_projections_from_torch(cfg, a.shape[1], b.shape[0])
        a[...], b[...] = backend.like(ta, a), backend.like(tb, b)
    expected = {k: tuple(getattr(t, "shape", ())) for k, t in targets.items()}
    path = directory / WEIGHTS_NAME
    tensors = load_safetensors(path, expected=expected, strict=True)
    for key, arr in tensors.items():  # every tensor checked before any is copied in
        if arr.dtype.kind != "f":
            raise CheckpointError(
                f"{path}: tensor {key!r}: expected a floating dtype, got {arr.dtype}"
            )
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or infinite values")
    for key, t in targets.items():
        arr = t.data if isinstance(t, Tensor) else t
        # read on the host, copied once to where the adapter lives
        arr[...] = backend.like(tensors[key].astype(arr.dtype, copy=False), arr)


def load_adapter(model: Module, directory: str | Path, adapter: str = "default") -> PeftModel:
    """Wrap ``model`` with the adapter stored in ``directory`` (written by HF PEFT or minipeft).

    Raises ``ValueError`` (``CheckpointError``) naming the problem for unsupported options,
    unknown or missing tensors and wrong shapes; on error ``model`` is left unwrapped.
    """
    d = Path(directory)
    cfg = read_adapter_config(d)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # float weights that an init (PiSSA/OLoRA) may rewrite; a 4-bit base is never rewritten
    originals = {
        n: m.weight.data.copy()
        for n, m in model.named_modules()
        if _is_target(cfg, n, m) and not getattr(m, "is_4bit", False)
    }
    pm = get_peft_model(model, cfg, adapter)
    try:
        _fill_adapter(pm, adapter, d, cfg)
    except BaseException:
        for name, layer in list(pm.adapter_layers()):
            _replace(model, name, layer.base_layer)
        for n, w in originals.items():
            model.get_submodule(n).weight.data[...] = w
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return pm


def add_adapter_from_dir(pm: PeftModel, directory: str | Path, adapter: str) -> None:
    """Add a further (LoRA) adapter named ``adapter`` to ``pm`` from an adapter directory.

    On error the half-added adapter is removed again.
    """
    d = Path(directory)
    cfg = read_adapter_config(d)
    if isinstance(cfg, LoraConfig) and str(cfg.init_lora_weights).lower() in ("pissa", "olora"):
        raise ValueError(
            "init_lora_weights: a PiSSA/OLoRA adapter changes the base weights; load it with "
            "PeftModel.from_pretrained on a fresh base model instead"
        )
    pm.add_adapter(adapter, cfg)
    try:
        _fill_adapter(pm, adapter, d, cfg)
    except BaseException:
        for _, layer in pm.adapter_layers():
            if adapter in getattr(layer, "r", {}):
                layer.delete_adapter(adapter)
        del pm.peft_config[adapter]
        raise


def _is_target(cfg: Any, name: str, mod: Module) -> bool:
    from .config import target_matches

    w = getattr(mod, "weight", None)
    return bool(name) and target_matches(cfg.target_modules, name) and getattr(w, "ndim", 0) == 2


__all__ += ["CheckpointError"]
