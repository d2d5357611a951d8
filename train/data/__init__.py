"""The data pipeline: sources -> tokenizer -> token files + manifest (`scalegpt prepare`) -> Mixture.

Names are imported lazily, so `from scalegpt.train.data.builtin import arithmetic_example` (eval) does
not pay for torch, datasets or tokenizers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Mixture": "mixture",
    "describe": "mixture",
    "feistel": "mixture",
    "read_manifest": "mixture",
    "prepare": "prepare",
    "prepare_command": "prepare",
    "planned_samples": "prepare",
    "EOT": "tokenizer",
    "load_tokenizer": "tokenizer",
    "eot_id": "tokenizer",
    "tokenizer_hash": "tokenizer",
    "train_bpe": "tokenizer",
    "token_dtype": "tokenizer",
    "arithmetic_example": "builtin",
    "scramble_example": "builtin",
    "prose_document": "builtin",
    "vocabulary": "builtin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
