"""`scalegpt prepare CONFIG`: sources -> tokenizer -> one memory-mapped token file per source + manifest.

The work runs in three phases so that bad input never costs existing data:

1. check and read: resolve every source (missing paths, unknown corpora, an unreachable Hub), read the
   sources that need work into one Arrow file of ~64 KB rows in a scratch folder (invalid UTF-8 and empty
   sources are found here), and train the BPE on a weighted sample if it is needed;
2. tokenize: one `datasets` map with num_proc workers over all those rows; documents are packed with
   <|endoftext|> after each one (GPT-3 Appendix B);
3. write: tokenizer.json, then each token file under a temporary name renamed when complete, then the
   manifest, rewritten (also atomically) after every source.

A source whose fingerprint, settings and tokenizer match its manifest entry is left alone, so re-running
with unchanged inputs does nothing, and a changed source is re-prepared alone.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from ..config import Config, global_batch, load_config
from ..errors import UserError
from ..osutil import write_json_atomic
from . import sources as src_mod
from .mixture import FORMAT, MANIFEST, Mixture, check_tokenizer_file, describe, read_manifest
from .tokenizer import (
    check_tokenizer,
    eot_id,
    is_chunk_safe,
    load_tokenizer,
    save_tokenizer,
    split_safe,
    token_byte_lengths,
    token_dtype,
    tokenizer_hash,
    train_bpe,
)

ROW_CHARS = 1 << 16
"""Characters per row of the tokenization dataset: rows of equal size balance the map's workers, and a
long document spans several rows."""
PIECE_CHARS = 1 << 12
"""Long documents are cut into pieces of about this many characters, only where the ids cannot change
(tokenizer.split_safe): encoding a few-KB string is ~1.5x faster per byte than a 64 KB one."""
TOKENIZER_FILE = "tokenizer.json"

_ROW_SCHEMA = pa.schema([("src", pa.int32()), ("pieces", pa.list_(pa.string())), ("ends", pa.list_(pa.bool_()))])

Echo = Callable[[str], None]


def prepare_command(args: argparse.Namespace) -> int:
    """The CLI entry point (launch/cli.py dispatches `scalegpt prepare` here)."""
    cfg = load_config(args.config, args.overrides)
    prepare(cfg)
    return 0


@dataclass
class _Work:
    """A source being (re-)prepared, and what reading and tokenizing it found."""

    index: int
    source: src_mod.Source
    stats: src_mod.ReadStats = field(default_factory=src_mod.ReadStats)
    rows: tuple[int, int] = (0, 0)
    chars: int = 0
    entry: dict[str, Any] = field(default_factory=dict)


def _file_name(name: str) -> str:
    """<name>.bin, made filesystem-safe (with a hash suffix whenever the name had to change)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "source"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{safe}.bin"


def _settings(cfg: Config, source: src_mod.Source, chunked: bool) -> dict[str, Any]:
    """Everything besides the inputs and the tokenizer that changes a source's token file."""
    return {
        "format": FORMAT,
        "val_fraction": cfg.data.val_fraction,
        "invalid_utf8": cfg.data.invalid_utf8,
        "text_field": source.cfg.text_field if source.kind != "builtin" else None,
        "chunked": chunked,
    }


def _up_to_date(
    entry: dict[str, Any] | None,
    source: src_mod.Source,
    settings: dict[str, Any],
    tok_hash: str | None,
    data_dir: Path,
    dtype: np.dtype,
) -> bool:
    if entry is None or tok_hash is None:
        return False
    path = data_dir / entry["file"]
    return (
        entry["fingerprint"] == source.fingerprint
        and entry["settings"] == settings
        and entry["tokenizer_hash"] == tok_hash
        and path.is_file()
        and path.stat().st_size == entry["tokens"] * dtype.itemsize
    )


# --- phase 1: read ----------------------------------------------------------------------------------


def _rows(frags: Iterator[src_mod.Fragment], chunk: int | None) -> Iterator[tuple[list[str], list[bool], int]]:
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


def _read(work: list[_Work], cfg: Config, chunk: int | None, path: Path, echo: Echo) -> int:
    """Write every source's rows to one Arrow stream file; return the row count."""
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _ROW_SCHEMA) as writer:
        for w in work:
            start = n
            buf: list[tuple[list[str], list[bool]]] = []
            frags = src_mod.fragments(w.source, invalid_utf8=cfg.data.invalid_utf8, chunk=chunk, stats=w.stats)
            for pieces, ends, size in _rows(frags, chunk):
                buf.append((pieces, ends))
                w.chars += size
                n += 1
                if len(buf) == 64:
                    writer.write_batch(_row_batch(w.index, buf))
                    buf = []
            if buf:
                writer.write_batch(_row_batch(w.index, buf))
            w.rows = (start, n)
            s = w.stats
            if s.documents == 0:
                what = f"{len(w.source.files)} file(s)" if w.source.kind == "files" else w.source.spec
                raise UserError(
                    f"source {w.source.name!r} ({w.source.spec}) is empty: no non-empty documents in {what}; "
                    f"point it at text or remove it from data.sources"
                )
            if s.bad_lines:
                echo(
                    f"  {w.source.name}: skipped {s.bad_lines} line(s) of invalid UTF-8 "
                    f"(first at {s.first_bad}); "
                    f"set data.invalid_utf8=error to stop instead"
                )
    return n


def _row_batch(src: int, rows: list[tuple[list[str], list[bool]]]) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([src] * len(rows), pa.int32()),
            pa.array([r[0] for r in rows], pa.list_(pa.string())),
            pa.array([r[1] for r in rows], pa.list_(pa.bool_())),
        ],
        schema=_ROW_SCHEMA,
    )


def _train_tokenizer(cfg: Config, work: list[_Work], ds: Any, echo: Echo) -> Tokenizer:
    """BPE on data.tokenizer_sample_mb of the mixture: each source contributes its weight's share, taken
    from rows spread evenly over the source."""
    weights = np.array([w.source.cfg.weight for w in work], dtype=np.float64)
    budget = cfg.data.tokenizer_sample_mb * 1e6 * weights / weights.sum()
    rows: list[int] = []
    for w, b in zip(work, budget, strict=True):
        lo, hi = w.rows
        take = hi - lo if w.chars <= b else max(1, math.ceil((hi - lo) * b / w.chars))
        rows.extend(lo + (np.arange(take) * (hi - lo)) // take)
    n_chars = 0

    def texts() -> Iterator[str]:
        nonlocal n_chars
        for batch in ds.select(rows).iter(batch_size=64):
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


# --- phase 2: tokenize --------------------------------------------------------------------------------


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}
"""Tokenizers by hash. Forked map workers inherit this, so they need not unpickle a large tokenizer;
spawned ones load it once from the scratch copy."""


def _worker_tokenizer(key: str, path: str) -> Tokenizer:
    if key not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[key] = Tokenizer.from_file(path)
    return _WORKER_TOKENIZERS[key]


def _encode_rows(batch: pa.Table, tok_key: str, tok_path: str, eot: int, dtype: str) -> pa.Table:
    """A batch of rows -> per row: token ids (EOT after each document end), token and byte offsets of the
    document ends within the row, and the row's UTF-8 bytes."""
    tok = _worker_tokenizer(tok_key, tok_path)
    all_pieces = batch.column("pieces").to_pylist()
    all_ends = batch.column("ends").to_pylist()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = iter(encode([p for pieces in all_pieces for p in pieces], add_special_tokens=False))
    chunks: list[list[int]] = []
    offsets, nbytes, doc_ends, doc_bytes = [0], [], [], []
    for pieces, ends in zip(all_pieces, all_ends, strict=True):
        n_tok = n_byte = 0
        row_ends, row_bytes = [], []
        for piece, end in zip(pieces, ends, strict=True):
            ids = next(encodings).ids
            chunks.append(ids)
            n_tok += len(ids)
            n_byte += len(piece.encode("utf-8"))
            if end:
                chunks.append([eot])
                n_tok += 1
                row_ends.append(n_tok)
                row_bytes.append(n_byte)
        offsets.append(offsets[-1] + n_tok)
        nbytes.append(n_byte)
        doc_ends.append(row_ends)
        doc_bytes.append(row_bytes)
    flat = np.fromiter(itertools.chain.from_iterable(chunks), dtype=dtype, count=offsets[-1])
    return pa.table(
        {
            "src": batch.column("src"),
            "ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat)),
            "doc_ends": pa.array(doc_ends, pa.list_(pa.int64())),
            "doc_bytes": pa.array(doc_bytes, pa.list_(pa.int64())),
            "nbytes": pa.array(nbytes, pa.int64()),
        }
    )


def _tokenize(ds: Any, tok: Tokenizer, tok_hash: str, dtype: np.dtype, num_proc: int, scratch: Path) -> Any:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    nproc = max(1, min(num_proc, len(ds), cpus))  # more workers than CPUs only adds contention
    _WORKER_TOKENIZERS[tok_hash] = tok
    tok_path = scratch / "tokenizer.json"
    tok.save(str(tok_path))
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    if nproc > 1:  # one single-threaded tokenizer per worker; also avoids the after-fork warning
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return ds.with_format("arrow").map(
            _encode_rows,
            batched=True,
            batch_size=8,
            num_proc=nproc if nproc > 1 else None,
            fn_kwargs={"tok_key": tok_hash, "tok_path": str(tok_path), "eot": eot_id(tok), "dtype": dtype.name},
            remove_columns=ds.column_names,
            cache_file_name=str(scratch / "tokens.arrow"),
            new_fingerprint=f"scalegpt-tokens-{tok_hash[:16]}-{len(ds)}",
        )
    finally:
        if nproc > 1:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved


# --- between phases 2 and 3: every count and check; then phase 3: write ----------------------------


def _summarize(w: _Work, table: Any, rows: tuple[int, int], cfg: Config, byte_len: np.ndarray) -> dict[str, Any]:
    """The source's manifest entry, from the tokenized rows alone (before anything is written): counts,
    and the train/validation split -- the last val_fraction of documents, or of tokens when there are
    too few documents to hold any out (one long text)."""
    lengths, ends, end_bytes = [], [], []
    n_tok = n_bytes = 0
    for a in range(rows[0], rows[1], 4096):
        t = table[a : min(a + 4096, rows[1])]
        row_len = np.diff(t.column("ids").combine_chunks().offsets.to_numpy()).astype(np.int64)
        row_bytes = t.column("nbytes").to_numpy().astype(np.int64)
        tok0 = n_tok + np.concatenate([[0], np.cumsum(row_len)[:-1]])
        byte0 = n_bytes + np.concatenate([[0], np.cumsum(row_bytes)[:-1]])
        for col, base, acc in (("doc_ends", tok0, ends), ("doc_bytes", byte0, end_bytes)):
            arr = t.column(col).combine_chunks()
            parents = np.repeat(np.arange(len(arr)), np.diff(arr.offsets.to_numpy()))
            acc.append(base[parents] + arr.flatten().to_numpy())
        lengths.append(row_len)
        n_tok += int(row_len.sum())
        n_bytes += int(row_bytes.sum())
    doc_end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    doc_end_bytes = np.concatenate(end_bytes) if end_bytes else np.zeros(0, np.int64)
    n_docs, vf = len(doc_end), cfg.data.val_fraction
    if vf > 0 and n_docs >= 2 and n_docs * vf >= 1:
        n_val = min(n_docs - 1, max(1, int(n_docs * vf + 0.5)))
        split, train_tok = "documents", int(doc_end[n_docs - n_val - 1])
        train_bytes = int(doc_end_bytes[n_docs - n_val - 1])
    else:
        split, train_tok = "tokens", n_tok - int(n_tok * vf + 0.5)
        row_start = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])  # tokens before each row
        first = int(np.searchsorted(row_start, train_tok, side="right")) - 1  # the row holding train_tok
        val_bytes, offset = 0, int(row_start[first])
        for a in range(rows[0] + first, rows[1], 512):  # the rows holding the validation tokens
            ids = table[a : min(a + 512, rows[1])].column("ids").combine_chunks()
            flat = ids.flatten().to_numpy()
            val_bytes += int(byte_len[flat[max(0, train_tok - offset) :]].sum())
            offset += len(flat)
        train_bytes = max(0, n_bytes - val_bytes)
    train_docs = int(np.searchsorted(doc_end, train_tok, side="right"))
    if train_tok < cfg.model.n_ctx + 1:
        raise UserError(
            f"source {w.source.name!r} has {train_tok} training tokens, fewer than one window of "
            f"n_ctx+1={cfg.model.n_ctx + 1}; add data to it, lower data.val_fraction, or use a smaller "
            f"model.n_ctx"
        )
    return {
        "name": w.source.name,
        "spec": w.source.spec,
        "kind": w.source.kind,
        "weight": w.source.cfg.weight,
        "file": _file_name(w.source.name),
        "fingerprint": w.source.fingerprint,
        "settings": {},  # filled by the caller
        "tokenizer_hash": "",  # filled by the caller
        "tokens": n_tok,
        "documents": n_docs,
        "bytes": n_bytes,
        "split": split,
        "train": {"tokens": train_tok, "documents": train_docs, "bytes": train_bytes},
        "val": {
            "tokens": n_tok - train_tok,
            "documents": n_docs - train_docs,
            "bytes": n_bytes - train_bytes,
        },
        "invalid_utf8_lines_skipped": w.stats.bad_lines,
        "empty_documents_skipped": w.stats.empty,
    }


def _write_tokens(table: Any, rows: tuple[int, int], final: Path, dtype: np.dtype, scratch: _Scratch) -> int:
    """Stream the rows' ids into final under a temporary name, renamed once complete and synced."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    scratch.files.append(tmp)
    n = 0
    with open(tmp, "wb") as f:
        for a in range(rows[0], rows[1], 512):
            ids = table[a : min(a + 512, rows[1])].column("ids").combine_chunks()
            flat = np.asarray(ids.flatten().to_numpy(), dtype=dtype)
            f.write(flat.tobytes())
            n += len(flat)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    scratch.files.remove(tmp)
    return n


class _Scratch:
    """Holds data.dir's lock and a scratch folder inside it for one prepare run. On exit the scratch
    folder, every temporary file and the lock go; so do the folders this run created, when they are
    left empty, so bad input leaves no trace."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.created = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
        data_dir.mkdir(parents=True, exist_ok=True)
        self.lock_path = data_dir / ".prepare.lock"
        self.lock = open(self.lock_path, "a")  # held until __exit__
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.lock.close()
            raise UserError(
                f"another `scalegpt prepare` is writing {data_dir}; wait for it to finish (run prepare once, "
                f"not on every rank)"
            ) from exc
        self.path = data_dir / f".prepare-tmp-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        self.files: list[Path] = []

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for f in self.files:
            f.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        self.lock.close()
        for folder in self.created:  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


# --- the command --------------------------------------------------------------------------------------


def planned_samples(cfg: Config) -> int:
    """Samples of the planned run at one process: max_steps x global batch. `prepare` cannot know the world size;
    with train.global_batch=0 a launch of N processes draws N times as many, which the trainer's epochs table shows."""
    return cfg.train.max_steps * global_batch(cfg, world_size=1)


@dataclass
class _Tok:
    """A tokenizer with the facts about it that are costly to recompute (GPT-2's JSON is megabytes)."""

    tok: Tokenizer
    hash: str
    eot: int

    @classmethod
    def of(cls, tok: Tokenizer) -> _Tok:
        return cls(tok, tokenizer_hash(tok), eot_id(tok))


@dataclass
class _Plan:
    """What a prepare run found before doing any work."""

    cfg: Config
    data_dir: Path
    dtype: np.dtype
    recipe: dict[str, Any]
    sources: list[src_mod.Source]
    old: dict[str, Any] | None
    chunked: bool

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def settings(self, i: int) -> dict[str, Any]:
        return _settings(self.cfg, self.sources[i], self.chunked)

    def old_entry(self, name: str) -> dict[str, Any] | None:
        return next((e for e in (self.old or {}).get("sources", []) if e["name"] == name), None)

    def stale(self, tok_hash: str | None) -> list[int]:
        return [
            i
            for i, s in enumerate(self.sources)
            if not _up_to_date(self.old_entry(s.name), s, self.settings(i), tok_hash, self.data_dir, self.dtype)
        ]

    def manifest(self, entries: dict[str, dict[str, Any]], tok: _Tok, file_sha: str) -> dict[str, Any]:
        weights = {s.name: s.cfg.weight for s in self.sources}
        return {
            "format": FORMAT,
            "tokenizer_hash": tok.hash,
            "tokenizer_file": TOKENIZER_FILE,
            "tokenizer_file_sha256": file_sha,
            "tokenizer_recipe": self.recipe,
            "vocab_size": self.cfg.model.vocab_size,
            "eot_id": tok.eot,
            "dtype": self.dtype.name,
            "sources": [{**entries[n], "weight": weights[n]} for n in self.names if n in entries],
        }

    def drop_removed(self, echo: Echo) -> None:
        for e in (self.old or {}).get("sources", []):
            if e["name"] not in self.names:
                (self.data_dir / e["file"]).unlink(missing_ok=True)
                echo(f"  removed source {e['name']!r} (no longer in data.sources) and its token file")


def prepare(cfg: Config, *, echo: Echo = print) -> dict[str, Any]:
    """Tokenize every source of cfg.data that is not already up to date in cfg.data.dir, print the mixture
    table for the planned run, and return the manifest. Bad input raises UserError and leaves data.dir
    as it was."""
    d = cfg.data
    if not d.sources:
        raise UserError("data.sources is empty; add at least one source (see configs/data/builtin.yaml)")
    vocab = cfg.model.vocab_size
    dtype = token_dtype(vocab)
    data_dir = Path(d.dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data.dir {data_dir} is a file, not a folder; point data.dir at a folder")
    old = read_manifest(data_dir)
    stored = data_dir / TOKENIZER_FILE
    if old is not None and stored.is_file():
        check_tokenizer_file(data_dir, old)
    sources = [src_mod.resolve(s) for s in d.sources]

    # the tokenizer: reuse the one trained before, load the configured one, or train one after reading
    tok: _Tok | None = None
    if d.tokenizer == "bpe":
        recipe: dict[str, Any] = {"kind": "bpe", "vocab_size": vocab, "sample_mb": d.tokenizer_sample_mb}
        if old is not None and old.get("tokenizer_recipe") == recipe and stored.is_file():
            loaded = load_tokenizer(stored)  # sources may change; the tokenizer stays unless its recipe does
            check_tokenizer(loaded, vocab, str(stored))
            tok = _Tok(loaded, old["tokenizer_hash"], eot_id(loaded))  # check_tokenizer_file vouched for it
    else:
        recipe = {"kind": "file", "path": d.tokenizer}
        loaded = load_tokenizer(d.tokenizer)
        check_tokenizer(loaded, vocab, d.tokenizer)
        tok = _Tok.of(loaded)
    plan = _Plan(cfg, data_dir, dtype, recipe, sources, old, tok is None or is_chunk_safe(tok.tok))
    if old is not None and tok is not None and old["tokenizer_hash"] != tok.hash:
        echo(f"the tokenizer changed ({old['tokenizer_hash'][:12]} -> {tok.hash[:12]}): re-preparing every source")
    stale = plan.stale(tok.hash if tok is not None else None)
    if stale:
        manifest = _run(plan, stale, tok, echo)
    else:
        assert tok is not None and old is not None
        manifest = plan.manifest({e["name"]: e for e in old["sources"]}, tok, save_tokenizer(tok.tok, stored))
        if manifest != old:
            write_json_atomic(data_dir / MANIFEST, manifest, indent=1)
        plan.drop_removed(echo)
        echo(f"nothing to do: all {len(sources)} sources in {data_dir} are up to date (tokenizer {tok.hash[:12]})")
    mix = Mixture(data_dir, cfg.model.n_ctx, cfg.run.seed, {s.name: s.cfg.weight for s in sources})
    echo(describe(mix, planned_samples(cfg)))
    return manifest


def _run(plan: _Plan, stale: list[int], tok: _Tok | None, echo: Echo) -> dict[str, Any]:
    """Phases 1-3 for the stale sources (every source when the BPE must be trained)."""
    import datasets

    _quiet_datasets()
    cfg, data_dir = plan.cfg, plan.data_dir
    indices = range(len(plan.sources)) if tok is None else stale
    work = [_Work(i, plan.sources[i]) for i in indices]
    echo(f"preparing {len(work)} of {len(plan.sources)} sources into {data_dir}")
    with _Scratch(data_dir) as scratch:
        t0 = time.perf_counter()
        n_rows = _read(work, cfg, PIECE_CHARS if plan.chunked else None, scratch.path / "text.arrow", echo)
        ds = datasets.Dataset.from_file(str(scratch.path / "text.arrow"))
        t_read = time.perf_counter() - t0
        if tok is None:
            tok = _Tok.of(_train_tokenizer(cfg, work, ds, echo))
            todo = set(plan.stale(tok.hash))
            if len(todo) < len(work):
                echo(f"  the tokenizer came out unchanged: {len(work) - len(todo)} source(s) are up to date")
            work = [w for w in work if w.index in todo]

        # phase 2: tokenize, then count and check everything before the first write
        table = None
        if work:
            t1 = time.perf_counter()
            rows = [r for w in work for r in range(*w.rows)]
            subset = ds if len(rows) == n_rows else ds.select(rows)
            out = _tokenize(subset, tok.tok, tok.hash, plan.dtype, cfg.data.num_proc, scratch.path)
            table = out.with_format("arrow")
            mb, t_tok = sum(w.chars for w in work) / 1e6, time.perf_counter() - t1
            echo(
                f"  read {mb:.2f} MB in {t_read:.1f}s, tokenized it in {t_tok:.1f}s "
                f"({mb / max(t_tok, 1e-9):.2f} MB/s with up to {cfg.data.num_proc} workers)"
            )
        byte_len = token_byte_lengths(tok.tok)
        spans, row = [], 0
        for w in work:
            spans.append((row, row + w.rows[1] - w.rows[0]))
            w.entry = _summarize(w, table, spans[-1], cfg, byte_len)
            w.entry.update(settings=plan.settings(w.index), tokenizer_hash=tok.hash)
            row = spans[-1][1]

        # phase 3: write. Nothing above touched data.dir beyond the scratch folder.
        file_sha = save_tokenizer(tok.tok, data_dir / TOKENIZER_FILE)
        redo = {w.source.name for w in work}
        entries = {e["name"]: e for e in (plan.old or {}).get("sources", []) if e["name"] not in redo}
        write_json_atomic(data_dir / MANIFEST, plan.manifest(entries, tok, file_sha), indent=1)
        for w, span in zip(work, spans, strict=True):
            written = _write_tokens(table, span, data_dir / w.entry["file"], plan.dtype, scratch)
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


def _quiet_datasets() -> None:
    """datasets' own progress bars only on a terminal; our one-line summaries say the rest."""
    import datasets

    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
