"""Which evaluation examples a run saw in training: GPT-3 Section 4 and Appendix C's contamination analysis.

An example is *dirty* when one of its N-grams occurs in the text the run trained on, and accuracy is then
reported on all, clean and dirty examples (Figure 4.2, Table C.1): a clean score well below the whole
one flags a score that memorization explains.

Words, grams and N per task are train/data/ngrams.py's, shared with decontamination (`scalegpt prepare`)
so that the two agree: the built-in synthetic tasks are looked up whole, answer included, so a 2D+
example is dirty exactly when "Q: What is 12 plus 7? A: 19" appears in the training text as a run of
words.

The training text is each trained-on source's token file in data.dir (its train split, the tokens the
sampler draws from), decoded document by document; a gram never spans two documents. The index keeps,
per source and gram length, the sorted distinct 64-bit hashes of the source's grams, in
data.dir/ngrams/ (`NgramIndex`). It is built once and reused until the source's manifest entry changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..data.ngrams import WHOLE, WordHasher, example_grams, gram_hashes, task_n, words
from ..data.tokenizer import load_tokenizer
from ..errors import check_writable_dir
from ..osutil import atomic_path
from .fewshot import ShotResult, TaskPlan
from .report import _grid, _pct

INDEX_DIR = "ngrams"
INDEX_VERSION = 1
"""Bump when the words, the hashing or the file layout change: every index is then rebuilt."""

_TOKENS_PER_BATCH = 1 << 20
"""Tokens decoded at a time while indexing: the Python word lists of a batch stay under ~100 MB."""
_BUCKET_HASHES = 1 << 22
"""Distinct hashes one bucket of an index build holds in memory (32 MB)."""

Echo = Callable[[str], None]


# --- the index --------------------------------------------------------------------------------------


def _entry_key(entry: dict[str, Any], n: int) -> str:
    """What an index file depends on: the source's whole manifest entry (inputs, settings, tokenizer,
    sizes) but its mixture weight, the gram length and the index version."""
    facts = {k: v for k, v in entry.items() if k != "weight"}
    blob = json.dumps({"entry": facts, "n": n, "version": INDEX_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stem(entry: dict[str, Any]) -> str:
    return Path(entry["file"]).stem


def index_path(data_dir: Path, entry: dict[str, Any], n: int) -> Path:
    return data_dir / INDEX_DIR / f"{_stem(entry)}.n{n}.{_entry_key(entry, n)}.u64"


def source_documents(
    data_dir: Path, entry: dict[str, Any], dtype: np.dtype, eot: int, tokenizer: Tokenizer
) -> Iterator[list[str]]:
    """The source's train split as text, a batch of whole documents at a time (prepare ends every
    document with end-of-text)."""
    tokens = np.memmap(data_dir / entry["file"], dtype=dtype, mode="r", shape=(int(entry["tokens"]),))
    end = int(entry["train"]["tokens"])
    carry = np.empty(0, dtype=dtype)
    for a in range(0, end, _TOKENS_PER_BATCH):
        block = np.concatenate([carry, tokens[a : min(end, a + _TOKENS_PER_BATCH)]])
        cuts = np.flatnonzero(block == eot)
        if len(cuts) == 0:
            carry = block
            continue
        starts = np.concatenate([[0], cuts[:-1] + 1])
        docs = [block[s:e].tolist() for s, e in zip(starts, cuts, strict=True)]
        carry = block[cuts[-1] + 1 :]
        yield tokenizer.decode_batch(docs, skip_special_tokens=False)
    if len(carry):
        yield tokenizer.decode_batch([carry.tolist()], skip_special_tokens=False)


@dataclass
class BuildStats:
    """What building a source's index cost: for the report and docs/sampling-and-evaluation.md."""

    source: str
    lengths: list[int]
    seconds: float
    words: int
    grams: dict[int, int] = field(default_factory=dict)
    """Distinct grams per length."""
    bytes: int = 0


def build_source_index(
    data_dir: Path,
    entry: dict[str, Any],
    lengths: Sequence[int],
    dtype: np.dtype,
    eot: int,
    tokenizer: Tokenizer,
) -> BuildStats:
    """Write the sorted distinct gram hashes of one source for each length, in one pass over its text.

    Memory stays bounded whatever the source's size: each batch's hashes are split by their top bits into
    bucket files (as many buckets as keep one under _BUCKET_HASHES), then each bucket is sorted and
    deduplicated alone; buckets in order are the whole sorted array. Each index file is written under a
    temporary name and renamed, so a reader never sees half of one."""
    t0 = time.perf_counter()
    estimate = int(entry["train"]["bytes"]) // 2  # words (and grams) are fewer than half the bytes
    bits = min(12, max(0, math.ceil(math.log2(max(1, estimate) / _BUCKET_HASHES))))
    out_dir = data_dir / INDEX_DIR
    out_dir.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    stats = BuildStats(entry["name"], sorted(lengths), 0.0, 0)
    try:
        hasher = WordHasher()
        for texts in source_documents(data_dir, entry, dtype, eot, tokenizer):
            per_doc = [words(t) for t in texts]
            flat = hasher([w for ws in per_doc for w in ws])
            stats.words += len(flat)
            doc_lengths = [len(ws) for ws in per_doc]
            for n in lengths:
                _append_buckets(scratch, n, _sorted_distinct(gram_hashes(flat, n, doc_lengths)), bits)
        for n in lengths:
            target = index_path(data_dir, entry, n)
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                count = 0
                for b in range(1 << bits):
                    part = scratch / f"n{n}.b{b}"
                    if part.is_file():
                        distinct = _sorted_distinct(np.fromfile(part, dtype=np.uint64))
                        distinct.tofile(f)
                        count += len(distinct)
                        part.unlink()
            stats.grams[n] = count
            stats.bytes += target.stat().st_size
            for old in out_dir.glob(f"{_stem(entry)}.n{n}.*.u64"):  # the index of an earlier version of the source
                if old != target:
                    old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stats.seconds = time.perf_counter() - t0
    return stats


def _sorted_distinct(a: np.ndarray) -> np.ndarray:
    """np.unique of a uint64 array by sorting (numpy's hash-based unique is several times slower here)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    return a[np.concatenate([[True], a[1:] != a[:-1]])]


def _append_buckets(scratch: Path, n: int, hashes: np.ndarray, bits: int) -> None:
    """Append sorted hashes to their bucket files (bucket = the top `bits` bits)."""
    if not len(hashes):
        return
    if bits == 0:
        with open(scratch / f"n{n}.b0", "ab") as f:
            hashes.tofile(f)
        return
    shift = np.uint64(64 - bits)
    bucket = (hashes >> shift).astype(np.int64)
    edges = np.searchsorted(bucket, np.arange((1 << bits) + 1))
    for b in np.unique(bucket):
        with open(scratch / f"n{n}.b{b}", "ab") as f:
            hashes[edges[b] : edges[b + 1]].tofile(f)


def _open(path: Path) -> np.ndarray:
    """An index file, memory-mapped (numpy cannot map an empty file: a source without grams)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint64)
    return np.memmap(path, dtype=np.uint64, mode="r")


class NgramIndex:
    """The gram hashes of every trained-on source of a prepared data.dir, for some gram lengths: built
    where missing or stale (unchanged sources are never re-read), then memory-mapped for lookups."""

    def __init__(
        self, data_dir: str | Path, manifest: dict[str, Any], sources: Sequence[str], lengths: Sequence[int], echo: Echo
    ) -> None:
        self.data_dir = Path(data_dir)
        self.lengths = sorted({int(n) for n in lengths if n > 0})
        entries = {e["name"]: e for e in manifest["sources"]}
        self.entries = [entries[s] for s in sources]
        self.built: list[BuildStats] = []
        dtype, eot = np.dtype(manifest["dtype"]), int(manifest["eot_id"])
        tokenizer: Tokenizer | None = None
        for e in self.entries:
            missing = [n for n in self.lengths if not index_path(self.data_dir, e, n).is_file()]
            if not missing:
                continue
            if tokenizer is None:
                check_writable_dir(self.data_dir / INDEX_DIR, "the n-gram index folder")
                tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
            echo(f"  indexing the {', '.join(map(str, missing))}-word grams of {e['name']!r} (once per data dir)")
            self.built.append(build_source_index(self.data_dir, e, missing, dtype, eot, tokenizer))
        self._arrays = {
            (e["name"], n): _open(index_path(self.data_dir, e, n)) for e in self.entries for n in self.lengths
        }

    @property
    def sources(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def files(self) -> list[Path]:
        return [index_path(self.data_dir, e, n) for e in self.entries for n in self.lengths]

    def sources_containing(self, n: int, hashes: np.ndarray) -> list[str]:
        """The sources in which any of these n-gram hashes occurs."""
        if not len(hashes):
            return []
        found = []
        for name in self.sources:
            index = self._arrays[(name, n)]
            if len(index) == 0:
                continue
            at = np.minimum(np.searchsorted(index, hashes), len(index) - 1)
            if bool((index[at] == hashes).any()):
                found.append(name)
        return found


# --- the analysis -----------------------------------------------------------------------------------


@dataclass
class TaskContamination:
    """Which of a task's queries occur in the training text."""

    task: str
    n: int
    lengths: list[int]
    """Each query's gram length in words."""
    dirty: list[bool]
    by_source: dict[str, int]
    """Dirty queries found in each source."""

    @property
    def n_label(self) -> str:
        lo, hi = min(self.lengths, default=0), max(self.lengths, default=0)
        size = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return f"whole ({size})" if self.n == WHOLE else str(self.n)

    def row(self) -> dict[str, Any]:
        k = sum(self.dirty)
        return {
            "task": self.task,
            "n": "whole" if self.n == WHOLE else self.n,
            "gram_words": sorted(set(self.lengths)),
            "examples": len(self.dirty),
            "dirty": k,
            "dirty_fraction": k / len(self.dirty) if self.dirty else 0.0,
            "dirty_by_source": self.by_source,
        }


def trained_sources(manifest: dict[str, Any], weights: Sequence[dict[str, float]]) -> list[str]:
    """The prepared sources with a positive weight in any of the run's stages: those it trained on."""
    names = [e["name"] for e in manifest["sources"]]
    return [n for n in names if any(w.get(n, 0.0) > 0 for w in weights)]


def check_plans(
    plans: Sequence[TaskPlan], data_dir: str | Path, manifest: dict[str, Any], sources: Sequence[str], echo: Echo
) -> tuple[list[TaskContamination], dict[str, Any]]:
    """Mark every query of every plan dirty or clean against the trained-on sources of data_dir; returns
    the marks and a description of the index (files, sizes, build costs)."""
    grams = {}
    for plan in plans:
        n = task_n(plan.task.name)
        grams[plan.task.name] = (n, example_grams([ep.query.line for ep in plan.episodes], n))
    lengths = {g for _, per in grams.values() for g, _ in per}
    index = NgramIndex(data_dir, manifest, sources, lengths, echo)
    out = []
    for name, (n, per) in grams.items():
        dirty, by_source = [], dict.fromkeys(index.sources, 0)
        for g, hashes in per:
            found = index.sources_containing(g, hashes) if g > 0 else []
            dirty.append(bool(found))
            for s in found:
                by_source[s] += 1
        out.append(TaskContamination(name, n, [g for g, _ in per], dirty, by_source))
    described = {
        "data_dir": str(data_dir),
        "sources": index.sources,
        "gram_words": index.lengths,
        "files": [str(p) for p in index.files()],
        "bytes": sum(p.stat().st_size for p in index.files()),
        "built": [vars(b) for b in index.built],
    }
    return out, described


@dataclass(frozen=True)
class SplitResult:
    """One (task, K) cell split into its clean and dirty queries."""

    task: str
    setting: str
    shots: int
    total: int
    dirty: int
    correct: int
    correct_clean: int
    correct_dirty: int

    @property
    def clean(self) -> int:
        return self.total - self.dirty

    def row(self) -> dict[str, Any]:
        def acc(c: int, n: int) -> float | None:
            return c / n if n else None

        return {
            "task": self.task,
            "setting": self.setting,
            "shots": self.shots,
            "examples": self.total,
            "dirty": self.dirty,
            "dirty_fraction": self.dirty / self.total if self.total else 0.0,
            "accuracy": acc(self.correct, self.total),
            "clean_accuracy": acc(self.correct_clean, self.clean),
            "dirty_accuracy": acc(self.correct_dirty, self.dirty),
            "correct": self.correct,
            "correct_clean": self.correct_clean,
            "correct_dirty": self.correct_dirty,
        }


def split_results(results: Sequence[ShotResult], marks: Sequence[TaskContamination]) -> list[SplitResult]:
    """Each result's accuracy on all, clean and dirty queries (its per-query hits against the marks)."""
    by_task = {m.task: m for m in marks}
    out = []
    for r in results:
        dirty = by_task[r.task].dirty
        if len(r.hits) != len(dirty):
            raise ValueError(f"{r.task}: {len(r.hits)} scored queries but {len(dirty)} marked")
        cd = sum(h and d for h, d in zip(r.hits, dirty, strict=True))
        out.append(SplitResult(r.task, r.setting, r.shots, r.total, sum(dirty), sum(r.hits), sum(r.hits) - cd, cd))
    return out


def contamination_table(splits: Sequence[SplitResult], marks: Sequence[TaskContamination]) -> str:
    """Table C.1's columns for each (task, K): N, dirty fraction, accuracy on all, clean and dirty
    queries, and clean minus all."""
    n_of = {m.task: m.n_label for m in marks}
    header = ["task", "K", "N (words)", "dirty", "all", "clean", "dirty acc", "clean - all"]
    rows = []
    for s in splits:
        r = s.row()

        def cell(x: float | None) -> str:
            return "-" if x is None else _pct(x)

        delta = "-" if r["clean_accuracy"] is None else f"{100 * (r['clean_accuracy'] - r['accuracy']):+.1f}"
        label = s.setting if s.setting != "few" else f"few ({s.shots})"
        rows.append(
            [
                s.task,
                label,
                n_of[s.task],
                _pct(r["dirty_fraction"]),
                cell(r["accuracy"]),
                cell(r["clean_accuracy"]),
                cell(r["dirty_accuracy"]),
                delta,
            ]
        )
    return "\n".join(_grid(header, rows))
