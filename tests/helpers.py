"""Small builders that several test files share: a tiny run config written as a file, prose to prepare,
and the one-line error check. Subprocess helpers live in e2e.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

from scalegpt.train.data import builtin

# A model too small to matter, so that a config file's data section is what a test exercises.
TINY = {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 16, "vocab_size": 512}


def write_config(path: Path, data: dict, model: dict | None = None) -> Path:
    """A whole run config as JSON (which is YAML), with no presets, so it can live in tmp_path."""
    cfg = {"model": {**TINY, **(model or {})}, "data": data, "train": {"max_steps": 10, "micro_batch": 4}}
    path.write_text(json.dumps(cfg))
    return path


def story(seed: int, n: int) -> str:
    """`n` built-in prose documents as one text, the same for the same seed."""
    rng = random.Random(seed)
    return "\n\n".join(builtin.prose_document(rng) for _ in range(n))


def one_error_line(err: str) -> str:
    """The command's stderr is exactly one `scalegpt: error: ...` line, with no traceback: return it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalegpt: error: "), err[-3000:]
    return lines[0]
