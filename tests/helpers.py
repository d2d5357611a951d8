"""Small builders that several test files share: a tiny run config written as a file, prose to prepare,
a prepared source decoded back into its documents, and the one-line error check. Subprocess helpers live in
e2e.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from scalegpt.train.data import builtin
from scalegpt.train.data.tokenizer import load_tokenizer

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


def decoded_documents(data_dir: Path, name: str) -> list[str]:
    """A second look at what prepare kept: source `name`'s token file (train and validation) split at
    <|endoftext|> and each document decoded."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    entry = next(e for e in manifest["sources"] if e["name"] == name)
    ids = np.fromfile(data_dir / entry["file"], dtype=manifest["dtype"])
    assert len(ids) == 0 or ids[-1] == manifest["eot_id"]
    tok = load_tokenizer(data_dir / "tokenizer.json")
    ends = np.flatnonzero(ids == manifest["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
