"""Phase 3: tokenizer.json, then each finished token file renamed from the scratch folder into data.dir,
then the manifest, rewritten (atomically) after every source, so an interrupted run leaves a consistent
data.dir: a token file is listed in the manifest only once it is complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...osutil import write_json_atomic
from ..checksum import fill_missing
from ..mixture import MANIFEST
from ..tokenizer import save_tokenizer
from .plan import TOKENIZER_FILE, Echo, PreparePlan, Tok, Work


def write_all(plan: PreparePlan, work: list[Work], files: list[Path], tok: Tok, echo: Echo) -> dict[str, Any]:
    """Write the tokenizer, move every worked source's finished token file into place, and write the
    manifest; return the manifest."""
    data_dir = plan.data_dir
    file_sha = save_tokenizer(tok.tok, data_dir / TOKENIZER_FILE)
    redo = {w.source.name for w in work}
    entries = {e["name"]: e for e in (plan.old or {}).get("sources", []) if e["name"] not in redo}
    say_filled(fill_missing(data_dir, entries), echo)
    write_json_atomic(data_dir / MANIFEST, plan.manifest(entries, tok, file_sha), indent=1)
    for w, path in zip(work, files, strict=True):
        final = data_dir / w.entry["file"]
        assert path.stat().st_size == w.entry["tokens"] * plan.dtype.itemsize
        os.replace(path, final)  # same file system: the scratch folder is inside data.dir
        entries[w.source.name] = w.entry
        write_json_atomic(data_dir / MANIFEST, plan.manifest(entries, tok, file_sha), indent=1)
        e, va = w.entry, w.entry["val"]
        echo(
            f"  {e['name']}: {e['tokens']:,} tokens, {e['documents']:,} documents, "
            f"{e['bytes'] / 1e6:.2f} MB -> {final} (validation: the last "
            f"{va['tokens']:,} tokens, split by {e['split']})"
        )
    plan.drop_removed(echo)
    return plan.manifest(entries, tok, file_sha)


def say_filled(names: list[str], echo: Echo) -> None:
    """One line when prepare recorded checksums that a data dir prepared before them lacked."""
    if names:
        echo(f"  recorded the checksums of {', '.join(names)} (prepared before checksums), as the files are now")
