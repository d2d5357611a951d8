"""Phase 2's bookkeeping: a source's token file written as its batches come back, with where its documents
end kept on disk beside it (not in memory, which would grow with the corpus), and its manifest entry with
the train/validation split, computed before anything in data.dir changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...config.schema import Config
from ...errors import UserError
from .plan import Work, file_name
from .workers import Encoded

_READ_TOKENS = 1 << 20
"""Tokens read at a time when the bytes of a token range are counted."""


class SourceTokens:
    """One source's token file in the scratch folder, and two int64 files beside it: the token position
    just past each document's EOT, and the UTF-8 byte position of each document's end."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.path = folder / file_name(name)
        self.ends_path = self.path.with_name(self.path.name + ".ends")
        self.bytes_path = self.path.with_name(self.path.name + ".ends-bytes")
        self._files = [open(p, "wb") for p in (self.path, self.ends_path, self.bytes_path)]
        self.tokens = self.bytes = self.documents = 0

    def add(self, e: Encoded) -> None:
        ids, ends, end_bytes = self._files
        ids.write(np.ascontiguousarray(e.ids, self.dtype).tobytes())
        ends.write((e.doc_ends + self.tokens).tobytes())
        end_bytes.write((e.doc_bytes + self.bytes).tobytes())
        self.tokens += len(e.ids)
        self.bytes += e.nbytes
        self.documents += len(e.doc_ends)

    def finish(self) -> None:
        """Close every file; the token file is synced, since it is renamed into data.dir as it is."""
        ids = self._files[0]
        ids.flush()
        os.fsync(ids.fileno())
        for f in self._files:
            f.close()

    def doc_ends(self, path: Path) -> np.ndarray:
        return np.memmap(path, np.int64, "r") if self.documents else np.zeros(0, np.int64)

    def bytes_from(self, start: int, byte_len: np.ndarray) -> int:
        """UTF-8 bytes of the tokens from position start on, read from the token file a slice at a time."""
        total = 0
        with open(self.path, "rb") as f:
            f.seek(start * self.dtype.itemsize)
            while chunk := f.read(_READ_TOKENS * self.dtype.itemsize):
                total += int(byte_len[np.frombuffer(chunk, self.dtype)].sum())
        return total


def _split(t: SourceTokens, val_fraction: float, byte_len: np.ndarray) -> tuple[str, int, int, int]:
    """(split kind, train tokens, train bytes, train documents): the last val_fraction of documents, or of
    tokens when there are too few documents to hold any out (one long text)."""
    n_docs = t.documents
    if val_fraction > 0 and n_docs >= 2 and n_docs * val_fraction >= 1:
        n_val = min(n_docs - 1, max(1, int(n_docs * val_fraction + 0.5)))
        last = n_docs - n_val - 1
        ends, end_bytes = t.doc_ends(t.ends_path), t.doc_ends(t.bytes_path)
        return "documents", int(ends[last]), int(end_bytes[last]), last + 1
    train_tok = t.tokens - int(t.tokens * val_fraction + 0.5)
    train_docs = int(np.searchsorted(t.doc_ends(t.ends_path), train_tok, side="right"))
    return "tokens", train_tok, max(0, t.bytes - t.bytes_from(train_tok, byte_len)), train_docs


def summarize(w: Work, t: SourceTokens, cfg: Config, byte_len: np.ndarray) -> dict[str, Any]:
    """The source's manifest entry (settings and tokenizer_hash are the caller's to fill)."""
    split, train_tok, train_bytes, train_docs = _split(t, cfg.data.val_fraction, byte_len)
    if train_tok < cfg.model.n_ctx + 1:
        raise UserError(
            f"source {w.source.name!r} has {train_tok} training tokens, fewer than one window of "
            f"n_ctx+1={cfg.model.n_ctx + 1}; add data to it, lower data.val_fraction, or use a smaller "
            f"model.n_ctx"
        )
    n_docs = t.documents
    return {
        "name": w.source.name,
        "spec": w.source.spec,
        "kind": w.source.kind,
        "weight": w.source.cfg.weight,
        "file": file_name(w.source.name),
        "fingerprint": w.source.fingerprint,
        "settings": {},
        "tokenizer_hash": "",
        "tokens": t.tokens,
        "documents": n_docs,
        "bytes": t.bytes,
        "split": split,
        "train": {"tokens": train_tok, "documents": train_docs, "bytes": train_bytes},
        "val": {"tokens": t.tokens - train_tok, "documents": n_docs - train_docs, "bytes": t.bytes - train_bytes},
        "invalid_utf8_lines_skipped": w.stats.bad_lines,
        "empty_documents_skipped": w.stats.empty,
    }
