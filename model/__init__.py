"""The network, pure PyTorch: imports nothing from train/ or launch/, and never deepspeed."""

from .config import ModelConfig
from .gpt import GPT, KVCache, build_model

__all__ = ["GPT", "KVCache", "ModelConfig", "build_model"]
