"""Between phases 2 and 3: a source's manifest entry, counted from its tokenized rows before anything is
written, with the train/validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...config import Config
from ...errors import UserError
from .plan import Work, file_name

_COUNT_ROWS = 4096
"""Rows per slice when counting: their offsets are small arrays, so large slices cost little memory."""
_ID_ROWS = 512
"""Rows per slice when the token ids themselves are read (up to ~64 KB of text each)."""


@dataclass
class _Counts:
    """What a source's tokenized rows hold, in positions from the start of the source."""

    row_tokens: np.ndarray
    """Tokens in each row."""
    doc_end: np.ndarray
    """Token position just past each document's EOT."""
    doc_end_bytes: np.ndarray
    """UTF-8 byte position of each document's end."""
    tokens: int
    bytes: int


def _count(table: Any, rows: tuple[int, int]) -> _Counts:
    lengths, ends, end_bytes = [], [], []
    n_tok = n_bytes = 0
    for a in range(rows[0], rows[1], _COUNT_ROWS):
        t = table[a : min(a + _COUNT_ROWS, rows[1])]
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

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    return _Counts(joined(lengths), joined(ends), joined(end_bytes), n_tok, n_bytes)


def _bytes_from(table: Any, rows: tuple[int, int], row_tokens: np.ndarray, start: int, byte_len: np.ndarray) -> int:
    """UTF-8 bytes of the source's tokens from position start on, reading only the rows that hold them."""
    row_start = np.concatenate([[0], np.cumsum(row_tokens)])  # tokens before each row
    first = int(np.searchsorted(row_start, start, side="right")) - 1  # the row holding token `start`
    total, offset = 0, int(row_start[first])
    for a in range(rows[0] + first, rows[1], _ID_ROWS):
        flat = table[a : min(a + _ID_ROWS, rows[1])].column("ids").combine_chunks().flatten().to_numpy()
        total += int(byte_len[flat[max(0, start - offset) :]].sum())
        offset += len(flat)
    return total


def _split(
    c: _Counts, table: Any, rows: tuple[int, int], val_fraction: float, byte_len: np.ndarray
) -> tuple[str, int, int]:
    """(split kind, train tokens, train bytes): the last val_fraction of documents, or of tokens when
    there are too few documents to hold any out (one long text)."""
    n_docs = len(c.doc_end)
    if val_fraction > 0 and n_docs >= 2 and n_docs * val_fraction >= 1:
        n_val = min(n_docs - 1, max(1, int(n_docs * val_fraction + 0.5)))
        last = n_docs - n_val - 1
        return "documents", int(c.doc_end[last]), int(c.doc_end_bytes[last])
    train_tok = c.tokens - int(c.tokens * val_fraction + 0.5)
    return "tokens", train_tok, max(0, c.bytes - _bytes_from(table, rows, c.row_tokens, train_tok, byte_len))


def summarize(w: Work, table: Any, rows: tuple[int, int], cfg: Config, byte_len: np.ndarray) -> dict[str, Any]:
    """The source's manifest entry (settings and tokenizer_hash are the caller's to fill)."""
    c = _count(table, rows)
    split, train_tok, train_bytes = _split(c, table, rows, cfg.data.val_fraction, byte_len)
    if train_tok < cfg.model.n_ctx + 1:
        raise UserError(
            f"source {w.source.name!r} has {train_tok} training tokens, fewer than one window of "
            f"n_ctx+1={cfg.model.n_ctx + 1}; add data to it, lower data.val_fraction, or use a smaller "
            f"model.n_ctx"
        )
    n_docs = len(c.doc_end)
    train_docs = int(np.searchsorted(c.doc_end, train_tok, side="right"))
    return {
        "name": w.source.name,
        "spec": w.source.spec,
        "kind": w.source.kind,
        "weight": w.source.cfg.weight,
        "file": file_name(w.source.name),
        "fingerprint": w.source.fingerprint,
        "settings": {},
        "tokenizer_hash": "",
        "tokens": c.tokens,
        "documents": n_docs,
        "bytes": c.bytes,
        "split": split,
        "train": {"tokens": train_tok, "documents": train_docs, "bytes": train_bytes},
        "val": {"tokens": c.tokens - train_tok, "documents": n_docs - train_docs, "bytes": c.bytes - train_bytes},
        "invalid_utf8_lines_skipped": w.stats.bad_lines,
        "empty_documents_skipped": w.stats.empty,
    }
