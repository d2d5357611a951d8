"""The network, pure PyTorch: imports nothing from train/ or launch/, and never deepspeed.

The torch-free parts (ModelConfig, flops) import without torch, so that commands that only read
configs (`scalegpt launch`, `plan`, config errors) answer in a fraction of a second; GPT, KVCache and
build_model load model/gpt.py, and torch with it, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ModelConfig

if TYPE_CHECKING:
    from .gpt import GPT, KVCache, build_model

__all__ = ["GPT", "KVCache", "ModelConfig", "build_model"]


def __getattr__(name: str) -> Any:
    if name in ("GPT", "KVCache", "build_model"):
        from . import gpt  # torch comes with it: commands that only read configs start without it

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
