"""Phase 1: every source's documents as rows of about ROW_CHARS characters, streamed straight to the
workers when the tokenizer is known; when a BPE must be trained first, written once to an Arrow file in the
scratch folder (the one copy of the input on disk), sampled for the BPE, then streamed back."""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from ...config.schema import Config
from ...errors import UserError
from .. import sources as src_mod
from ..tokenizer import split_safe, train_bpe
from .decontaminate import Decontaminator
from .dedup import Deduplicator
from .lock import SCRATCH_PREFIX
from .plan import Echo, Work
from .workers import Row

ROW_CHARS = 1 << 16
"""Characters per row of the tokenization dataset: rows of equal size balance the map's workers, and a
long document spans several rows."""
PIECE_CHARS = 1 << 12
"""Long documents are cut into pieces of about this many characters, only where the ids cannot change
(tokenizer.split_safe): encoding a few-KB string is ~1.5x faster per byte than a 64 KB one."""

ROW_SCHEMA = pa.schema([("src", pa.int32()), ("pieces", pa.list_(pa.string())), ("ends", pa.list_(pa.bool_()))])
_BATCH_ROWS = 64
"""Rows per Arrow record batch written: small batches keep memory flat while reading a large source."""
TASK_ROWS = 2
"""Rows per batch sent to a worker (~128 KB of text): one encode_batch call each. While it encodes a batch,
a worker holds ~200 bytes per byte of its text (GPT-2's BPE: ~110 MB for 512 KB, encodings and their
alignments), so small batches keep the workers' peaks low and even."""


def rows(frags: Iterator[src_mod.Fragment], chunk: int | None) -> Iterator[tuple[list[str], list[bool], int]]:
    """Pack document pieces into rows of about ROW_CHARS characters (pieces, ends-document flags)."""
    pieces: list[str] = []
    ends: list[bool] = []
    size = 0
    for text, end in frags:
        parts = split_safe(text, chunk) if chunk and len(text) > chunk else [text]
        for j, part in enumerate(parts):
            pieces.append(part)
            ends.append(end and j == len(parts) - 1)
            size += len(part)
            if size >= ROW_CHARS:
                yield pieces, ends, size
                pieces, ends, size = [], [], 0
    if pieces:
        yield pieces, ends, size


def row_batch(src: int, batch: list[tuple[list[str], list[bool]]]) -> pa.RecordBatch:
    """Rows of one source as a record batch of ROW_SCHEMA."""
    return pa.record_batch(
        [
            pa.array([src] * len(batch), pa.int32()),
            pa.array([r[0] for r in batch], pa.list_(pa.string())),
            pa.array([r[1] for r in batch], pa.list_(pa.bool_())),
        ],
        schema=ROW_SCHEMA,
    )


def read_sources(work: list[Work], cfg: Config, chunk: int | None, path: Path, echo: Echo) -> int:
    """Write every source's rows to one Arrow stream file; return the row count."""
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ROW_SCHEMA) as writer:
        for w in work:
            start = n
            buf: list[tuple[list[str], list[bool]]] = []
            frags = curated(w, cfg, chunk)
            for pieces, ends, size in rows(frags, chunk):
                buf.append((pieces, ends))
                w.chars += size
                n += 1
                if len(buf) == _BATCH_ROWS:
                    writer.write_batch(row_batch(w.index, buf))
                    buf = []
            if buf:
                writer.write_batch(row_batch(w.index, buf))
            w.rows = (start, n)
            report(w, echo)
    return n


def curated(w: Work, cfg: Config, chunk: int | None) -> Iterator[src_mod.Fragment]:
    """The source's documents after its `curation:` steps (decontaminate.py), whose counts go to w.curation."""
    frags = src_mod.fragments(w.source, invalid_utf8=cfg.data.invalid_utf8, chunk=chunk, stats=w.stats)
    if w.quality is not None:
        w.quality = w.quality.fresh()
        frags = w.quality.apply(frags)
    if w.dedup_job is not None:  # its spool goes to this run's scratch folder (lock.Scratch), cleaned up with it
        work = Path(cfg.data.dir) / f"{SCRATCH_PREFIX}{os.getpid()}" / f"dedup-{w.index}"
        dedup_step = Deduplicator(w.dedup_job, w.source.name, work, Path(cfg.data.dir))
        w.dedup_stats = dedup_step.stats
        frags = dedup_step.apply(frags)
    step = Decontaminator.of(w.source.cfg.curation.decontaminate, f"data.sources.{w.index}.curation.decontaminate")
    if step is None:
        return frags
    w.curation = step.stats
    return step.apply(frags)


def source_rows(w: Work, cfg: Config, chunk: int | None) -> Iterator[Row]:
    """The source's rows read straight from it, counting its characters into w.chars."""
    frags = curated(w, cfg, chunk)
    for pieces, ends, size in rows(frags, chunk):
        w.chars += size
        yield pieces, ends


def stored_rows(path: Path) -> Iterator[Row]:
    """Every row of the Arrow file read_sources wrote, one record batch in memory at a time."""
    with pa.OSFile(str(path), "rb") as f:
        for batch in pa.ipc.open_stream(f):
            yield from zip(batch.column("pieces").to_pylist(), batch.column("ends").to_pylist(), strict=True)


def work_rows(stored: Iterator[Row], consumed: int, w: Work) -> Iterator[Row]:
    """w's rows from the shared iterator over the stored rows, of which `consumed` were taken before."""
    return itertools.islice(stored, w.rows[0] - consumed, w.rows[1] - consumed)


def batched(items: Iterable[Row], n: int = TASK_ROWS) -> Iterator[list[Row]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def report(w: Work, echo: Echo) -> None:
    """An empty source stops the run; skipped lines of invalid UTF-8 are counted for the user."""
    s = w.stats
    if s.documents == 0:
        what = f"{len(w.source.files)} file(s)" if w.source.kind == "files" else w.source.spec
        raise UserError(
            f"source {w.source.name!r} ({w.source.spec}) is empty: no non-empty documents in {what}; "
            f"point it at text or remove it from data.sources"
        )
    if w.quality is not None:
        if w.quality.staged is not None:
            echo(f"  {w.source.name}: quality scores looked up in {w.quality.staged.where} (`scalegpt curate`)")
        echo(f"  {w.source.name}: quality filter: {w.quality.stats.summary()}")
    if w.dedup_stats is not None:
        if w.dedup_job is not None and w.dedup_job.staged is not None:
            echo(f"  {w.source.name}: dedup signatures looked up in {w.dedup_job.staged.where} (`scalegpt curate`)")
        echo(f"  {w.source.name}: deduplicated: {w.dedup_stats.summary()}")
    if w.curation is not None:
        echo(f"  {w.source.name}: decontaminated: {w.curation.summary()}")
    if s.bad_lines:
        echo(
            f"  {w.source.name}: skipped {s.bad_lines} line(s) of invalid UTF-8 (first at {s.first_bad}); "
            f"set data.invalid_utf8=error to stop instead"
        )


def train_tokenizer(cfg: Config, work: list[Work], ds: Any, echo: Echo) -> Tokenizer:
    """BPE on data.tokenizer_sample_mb of the mixture: each source contributes its weight's share, taken
    from rows spread evenly over the source."""
    weights = np.array([w.source.cfg.weight for w in work], dtype=np.float64)
    budget = cfg.data.tokenizer_sample_mb * 1e6 * weights / weights.sum()
    picked: list[int] = []
    for w, b in zip(work, budget, strict=True):
        lo, hi = w.rows
        take = hi - lo if w.chars <= b else max(1, math.ceil((hi - lo) * b / w.chars))
        picked.extend(lo + (np.arange(take) * (hi - lo)) // take)
    n_chars = 0

    def texts() -> Iterator[str]:
        nonlocal n_chars
        for batch in ds.select(picked).iter(batch_size=64):
            for pieces in batch["pieces"]:
                n_chars += sum(map(len, pieces))
                yield from pieces

    t0 = time.perf_counter()
    tok = train_bpe(texts(), cfg.model.vocab_size)
    echo(
        f"  trained a byte-level BPE of {cfg.model.vocab_size} tokens on a {n_chars / 1e6:.2f} MB sample "
        f"of the mixture in {time.perf_counter() - t0:.1f}s"
    )
    return tok
