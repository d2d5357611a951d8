"""Phase 3: tokenizer.json, then each token file under a temporary name renamed when complete, then the
manifest, rewritten (atomically) after every source, so an interrupted run leaves a consistent data.dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...osutil import write_json_atomic
from ..mixture import MANIFEST
from ..tokenizer import save_tokenizer
from .lock import Scratch
from .plan import TOKENIZER_FILE, Echo, Plan, Tok, Work

_ID_ROWS = 512
"""Rows per slice streamed to a token file (up to ~64 KB of text each)."""


def write_tokens(table: Any, rows: tuple[int, int], final: Path, dtype: np.dtype, scratch: Scratch) -> int:
    """Stream the rows' ids into final under a temporary name, renamed once complete and synced."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    scratch.files.append(tmp)
    n = 0
    with open(tmp, "wb") as f:
        for a in range(rows[0], rows[1], _ID_ROWS):
            ids = table[a : min(a + _ID_ROWS, rows[1])].column("ids").combine_chunks()
            flat = np.asarray(ids.flatten().to_numpy(), dtype=dtype)
            f.write(flat.tobytes())
            n += len(flat)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    scratch.files.remove(tmp)
    return n


def write_all(
    plan: Plan, work: list[Work], spans: list[tuple[int, int]], table: Any, tok: Tok, scratch: Scratch, echo: Echo
) -> dict[str, Any]:
    """Write the tokenizer, every worked source's token file and the manifest; return the manifest."""
    data_dir = plan.data_dir
    file_sha = save_tokenizer(tok.tok, data_dir / TOKENIZER_FILE)
    redo = {w.source.name for w in work}
    entries = {e["name"]: e for e in (plan.old or {}).get("sources", []) if e["name"] not in redo}
    write_json_atomic(data_dir / MANIFEST, plan.manifest(entries, tok, file_sha), indent=1)
    for w, span in zip(work, spans, strict=True):
        written = write_tokens(table, span, data_dir / w.entry["file"], plan.dtype, scratch)
        assert written == w.entry["tokens"]
        entries[w.source.name] = w.entry
        write_json_atomic(data_dir / MANIFEST, plan.manifest(entries, tok, file_sha), indent=1)
        e, va = w.entry, w.entry["val"]
        echo(
            f"  {e['name']}: {e['tokens']:,} tokens, {e['documents']:,} documents, "
            f"{e['bytes'] / 1e6:.2f} MB -> {data_dir / e['file']} (validation: the last "
            f"{va['tokens']:,} tokens, split by {e['split']})"
        )
    plan.drop_removed(echo)
    return plan.manifest(entries, tok, file_sha)
