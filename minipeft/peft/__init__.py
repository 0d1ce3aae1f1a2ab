"""Parameter-efficient fine-tuning: LoRA and its family, adapter injection, HF PEFT files."""

from .adalora import AdaLoraConfig, RankAllocator, SVDLinear
from .adapters import BottleneckAdapter, add_adapters
from .config import IA3Config, LoraConfig, PeftConfig, VeraConfig, config_from_dict
from .dora import dora_delta, dora_merged_weight, dora_weight_norm
from .ia3 import IA3Layer, apply_bitfit, ia3_linear
from .inject import PeftModel, count_parameters, get_peft_model
from .lora import (
    LoraLayer,
    lora_linear,
    lora_scaling,
    loraplus_param_groups,
    olora_init,
    pissa_init,
)
from .prompts import PrefixTuning, PromptedModel, PromptTuning, PTuningV2
from .qlora import Linear4bit, quantize_model
from .vera import VeraLayer, vera_linear

__all__ = [
    "AdaLoraConfig",
    "BottleneckAdapter",
    "IA3Config",
    "IA3Layer",
    "Linear4bit",
    "LoraConfig",
    "LoraLayer",
    "PTuningV2",
    "PeftConfig",
    "PeftModel",
    "PrefixTuning",
    "PromptTuning",
    "PromptedModel",
    "RankAllocator",
    "SVDLinear",
    "VeraConfig",
    "VeraLayer",
    "add_adapters",
    "apply_bitfit",
    "config_from_dict",
    "count_parameters",
    "dora_delta",
    "dora_merged_weight",
    "dora_weight_norm",
    "get_peft_model",
    "ia3_linear",
    "lora_linear",
    "lora_scaling",
    "loraplus_param_groups",
    "olora_init",
    "pissa_init",
    "quantize_model",
    "vera_linear",
]  # fmt: skip
