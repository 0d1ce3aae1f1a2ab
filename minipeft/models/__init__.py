"""Models with Hugging Face module names and weight layouts, and checkpoint IO."""

from .bert import BertConfig, BertModel, BertTokenizer
from .gpt2 import GPT2, GPT2Config
from .io import (
    CheckpointError,
    load_safetensors,
    read_json_config,
    save_safetensors_atomic,
)

__all__ = [
    "GPT2",
    "BertConfig",
    "BertModel",
    "BertTokenizer",
    "CheckpointError",
    "GPT2Config",
    "load_safetensors",
    "read_json_config",
    "save_safetensors_atomic",
]  # fmt: skip
