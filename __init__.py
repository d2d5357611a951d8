"""scalegpt: a small-scale GPT-3-style training stack on DeepSpeed ZeRO-2."""

__version__ = "0.1.0"
