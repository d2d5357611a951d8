"""Phase 2: one `datasets` map over the rows, each worker encoding with its own tokenizer."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from ..tokenizer import eot_id

WORKER_TOKENIZERS: dict[str, Tokenizer] = {}
"""Tokenizers by hash. Forked map workers inherit this, so they need not unpickle a large tokenizer;
spawned ones load it once from the scratch copy."""


def worker_tokenizer(key: str, path: str) -> Tokenizer:
    if key not in WORKER_TOKENIZERS:
        WORKER_TOKENIZERS[key] = Tokenizer.from_file(path)
    return WORKER_TOKENIZERS[key]


def encode_rows(batch: pa.Table, tok_key: str, tok_path: str, eot: int, dtype: str) -> pa.Table:
    """A batch of rows -> per row: token ids (EOT after each document end), token and byte offsets of the
    document ends within the row, and the row's UTF-8 bytes."""
    tok = worker_tokenizer(tok_key, tok_path)
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


def tokenize(ds: Any, tok: Tokenizer, tok_hash: str, dtype: np.dtype, num_proc: int, scratch: Path) -> Any:
    """The rows of ds encoded by up to num_proc workers, cached as an Arrow file in the scratch folder."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    nproc = max(1, min(num_proc, len(ds), cpus))  # more workers than CPUs only adds contention
    WORKER_TOKENIZERS[tok_hash] = tok
    tok_path = scratch / "tokenizer.json"
    tok.save(str(tok_path))
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    if nproc > 1:  # one single-threaded tokenizer per worker; also avoids the after-fork warning
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return ds.with_format("arrow").map(
            encode_rows,
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


def quiet_datasets() -> None:
    """datasets' own progress bars only on a terminal; our one-line summaries say the rest."""
    import datasets

    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
