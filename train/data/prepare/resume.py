"""Taking over what a killed run finished: a source's token file counts as finished in the scratch folder
once its manifest entry is written beside it (after the file is synced). A run killed while tokenizing
leaves only its scratch folder, which nothing reads as complete; the next run takes over the sources
whose inputs, settings and tokenizer still match, and tokenizes the rest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...osutil import write_json_atomic
from .lock import Scratch
from .plan import Work, file_name

_SUFFIX = ".entry.json"


def finished(path: Path, entry: dict[str, Any], chars: int) -> None:
    """Mark the synced token file at path finished, with its manifest entry."""
    write_json_atomic(path.with_name(path.name + _SUFFIX), {"entry": entry, "chars": chars})


def adopt(scratch: Scratch, w: Work, expect: dict[str, Any], dtype: np.dtype) -> Path | None:
    """Move a token file for w that a killed run finished into this run's scratch folder, when its entry
    matches w's inputs and the expected settings and tokenizer hash; return its new path (and fill w)."""
    name = file_name(w.source.name)
    for folder in scratch.leftovers:
        path, marker = folder / name, folder / (name + _SUFFIX)
        try:
            saved = json.loads(marker.read_text())
            entry, size = saved["entry"], path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            continue
        same = all(entry.get(k) == v for k, v in expect.items())
        if same and entry.get("fingerprint") == w.source.fingerprint and entry.get("name") == w.source.name:
            if size == entry["tokens"] * dtype.itemsize:
                target = scratch.path / name
                os.replace(path, target)
                w.entry, w.chars = entry, int(saved["chars"])
                return target
    return None
