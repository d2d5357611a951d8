"""Per-document curation work done ahead of `scalegpt prepare`, on an executor (launch/curate.py): the
quality filter's scores and dedup's MinHash signatures of a source's documents.

Scoring and signing every document is the costly part of curation, and each document's result depends on
its text alone, so tasks on a cluster can compute them in any split. What they write is keyed by a hash
of each document's text, not by its place, so a split by task, a re-read in another order or a resume
needs no bookkeeping. `prepare` then reads the source as always and, for each document, looks its result
up instead of computing it; the decisions (the keep rule's draws, dedup's clusters and its ranking
against earlier sources) stay in prepare, so a staged run and a local one make the same token files. The
results are used only when they were made from the same inputs and settings (`Key`); otherwise prepare
computes as if there were none, and says so.

Layout: data.dir/curation/staged/<source>/ holds shard-<rank>.npz from each task, then result/, the merge of
them all, renamed into place last (the merge task's output; its presence means done): per step, its
documents' hashes sorted and one .npy per array beside them, and meta.json with the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...osutil import atomic_path, write_json_atomic
from ..curation import CURATION_DIR

VERSION = 1
STAGED_DIR = "staged"
RESULT = "result"


def doc_hashes(docs: Sequence[str]) -> np.ndarray:
    """64 bits of BLAKE2b of each document's text: the key its results are stored under."""
    out = np.empty(len(docs), dtype=np.uint64)
    for i, d in enumerate(docs):
        digest = hashlib.blake2b(d.encode("utf-8", "surrogatepass"), digest_size=8, person=b"staged-doc").digest()
        out[i] = int.from_bytes(digest, "little")
    return out


@dataclass(frozen=True)
class Key:
    """What staged results were computed from: a different key means they are not this run's."""

    source: str
    """The source's fingerprint (sources.py: its inputs)."""
    quality: str | None
    """The quality classifier's fingerprint and keep rule, when the source has the step."""
    dedup: str | None
    """The dedup settings that decide a signature (shingle, hashes, bands, rensa's algorithm version)."""
    version: int = VERSION

    def row(self) -> dict[str, Any]:
        return asdict(self)


def folder(data_dir: Path, source_file: str) -> Path:
    """Where the staged results of the source whose token file is source_file go."""
    return data_dir / CURATION_DIR / STAGED_DIR / Path(source_file).stem


def write_shard(where: Path, rank: int, arrays: dict[str, np.ndarray]) -> None:
    """One task's results, atomically: a killed task leaves none. Names are `<step>-<array>`; each step's
    `<step>-hashes` says which documents its rows are (dedup signs only the documents quality kept)."""
    where.mkdir(parents=True, exist_ok=True)
    with atomic_path(where / f"shard-{rank:05d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def merge(where: Path, tasks: int, key: Key) -> dict[str, int]:
    """The shards of all tasks as one result per step, sorted by document hash (a document that occurs twice
    has the same results twice, so one is kept), each array a .npy that prepare maps rather than loads.
    Returns the number of distinct documents per step."""
    parts: dict[str, list[np.ndarray]] = {}
    for rank in range(tasks):
        path = where / f"shard-{rank:05d}.npz"
        if not path.is_file():
            raise UserError(f"{path} is missing: task {rank} of the curation job did not finish; run it again")
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                parts.setdefault(name, []).append(z[name])
    out = where / RESULT
    tmp = where / f".{RESULT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    counts = {}
    for step in sorted({name.split("-", 1)[0] for name in parts}):
        _, first = np.unique(np.concatenate(parts[f"{step}-hashes"]), return_index=True)
        counts[step] = len(first)
        for name in [n for n in parts if n.split("-", 1)[0] == step]:
            np.save(tmp / f"{name}.npy", np.concatenate(parts[name])[first])
    write_json_atomic(tmp / "meta.json", {"key": key.row(), "documents": counts, "tasks": tasks})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    for rank in range(tasks):
        os.unlink(where / f"shard-{rank:05d}.npz")
    return counts


@dataclass
class Staged:
    """One step's staged results for a source, looked up by document text; the arrays are memory-mapped, so
    a source of any size costs only the pages its lookups touch."""

    where: Path
    hashes: np.ndarray
    arrays: dict[str, np.ndarray]

    @classmethod
    def load(cls, where: Path, key: Key, step: str) -> Staged | None:
        """The step's results in `where` when they were made for this key; None when there are none or they are
        not this run's."""
        folder = where / RESULT
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("key") != key.row() or step not in meta.get("documents", {}):
                return None
            arrays = {
                p.stem.split("-", 1)[1]: np.load(p, mmap_mode="r", allow_pickle=False)
                for p in sorted(folder.glob(f"{step}-*.npy"))
            }
        except (OSError, ValueError):
            return None
        return cls(folder, arrays.pop("hashes"), arrays)

    def rows(self, docs: Sequence[str]) -> np.ndarray:
        """Each document's row in the results; a document the job never saw means the source changed under it."""
        h = doc_hashes(docs)
        at = np.minimum(np.searchsorted(self.hashes, h), max(len(self.hashes) - 1, 0))
        found = (self.hashes[at] == h) if len(self.hashes) else np.zeros(len(h), dtype=bool)
        if not found.all():
            raise UserError(
                f"a document of this source is not in the staged results in {self.where} (the source changed "
                f"since `scalegpt curate` ran); run `scalegpt curate` again, or delete that folder to curate here"
            )
        return at

    def get(self, name: str, docs: Sequence[str]) -> np.ndarray:
        return np.asarray(self.arrays[name][self.rows(docs)])
