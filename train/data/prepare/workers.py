"""Phase 2's engine: worker processes that encode batches of rows with `tokenizers`' batch encoding.

The main process reads and writes; the workers only encode. At most a few batches per worker are in
flight, so memory stays flat however large the corpus is (a `datasets.map` over the whole corpus would
keep Arrow caches of two to three times its size on disk, and its pages in memory).

Stopping: workers ignore SIGINT (Ctrl-C reaches the whole process group; the main process alone turns it
into a clean exit), die with their parent (kill -9 of the main process), and close their inherited copy
of data.dir's lock, so that no worker can outlive the run holding the lock.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tokenizers import Tokenizer

Row = tuple[list[str], list[bool]]
"""A row of the tokenization: document pieces and, for each, whether a document ends with it."""

IN_FLIGHT = 3
"""Batches queued per worker: enough to keep every worker busy while the main process writes."""

WORKER_TOKENIZERS: dict[str, Tokenizer] = {}
"""Tokenizers by hash. Forked workers inherit this, so they need not parse a large tokenizer again;
spawned ones load it once from the scratch copy."""


@dataclass
class Encoded:
    """One batch of rows encoded: ids with EOT after each document, and where the documents end."""

    ids: np.ndarray
    doc_ends: np.ndarray
    """Token position just past each document's EOT, from the start of the batch."""
    doc_bytes: np.ndarray
    """UTF-8 byte position of each document's end, from the start of the batch."""
    nbytes: int


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim: after each batch a worker hands the freed heap back to the system. Without it
    a worker's resident memory creeps from ~0.1 GB to ~0.3 GB over its first hundred batches (freed
    encodings and strings stay in the heap), and the tree's peak grows with how long the run is."""
    try:
        return ctypes.CDLL(None).malloc_trim if sys.platform == "linux" else None
    except (OSError, AttributeError):  # musl and other C libraries have none
        return None


_TRIM = _malloc_trim()


def worker_tokenizer(key: str, path: str) -> Tokenizer:
    if key not in WORKER_TOKENIZERS:
        WORKER_TOKENIZERS[key] = Tokenizer.from_file(path)
    return WORKER_TOKENIZERS[key]


def encode_rows(rows: list[Row], tok_key: str, tok_path: str, eot: int, dtype: str) -> Encoded:
    """Encode every piece of the rows in one batch call and pack them, EOT after each document end."""
    tok = worker_tokenizer(tok_key, tok_path)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode([p for pieces, _ in rows for p in pieces], add_special_tokens=False)
    chunks: list[list[int]] = []
    doc_ends: list[int] = []
    doc_bytes: list[int] = []
    n_tok = n_byte = 0
    flags = (end for _, ends in rows for end in ends)
    pieces = (p for ps, _ in rows for p in ps)
    for enc, piece, end in zip(encodings, pieces, flags, strict=True):
        ids = enc.ids
        chunks.append(ids)
        n_tok += len(ids)
        n_byte += len(piece.encode("utf-8"))
        if end:
            chunks.append([eot])
            n_tok += 1
            doc_ends.append(n_tok)
            doc_bytes.append(n_byte)
    flat = np.fromiter(itertools.chain.from_iterable(chunks), dtype=dtype, count=n_tok)
    del encodings, chunks
    if _TRIM is not None:
        _TRIM(0)
    return Encoded(flat, np.array(doc_ends, np.int64), np.array(doc_bytes, np.int64), n_byte)


def _die_with_parent(parent: int, lock_fd: int) -> None:
    """Pool initializer: see the module docstring."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: Pool.terminate() must just end it
    if lock_fd >= 0:
        os.close(lock_fd)
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class Encoder:
    """Encodes batches of rows in order, in num_proc worker processes (or in this one when num_proc is 1)."""

    def __init__(
        self, tok: Tokenizer, tok_hash: str, eot: int, dtype: np.dtype, num_proc: int, *, scratch: Path, lock_fd: int
    ) -> None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.nproc = max(1, min(num_proc, cpus))  # more workers than CPUs only adds contention
        WORKER_TOKENIZERS[tok_hash] = tok
        tok_path = scratch / "tokenizer.json"
        tok.save(str(tok_path))
        self.args = (tok_hash, str(tok_path), eot, dtype.name)
        self.pool: Any = None
        self._saved = os.environ.get("TOKENIZERS_PARALLELISM")
        if self.nproc > 1:  # one single-threaded tokenizer per worker; also avoids the after-fork warning
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = multiprocessing.get_context()
            inherited = lock_fd if ctx.get_start_method() == "fork" else -1
            self.pool = ctx.Pool(self.nproc, initializer=_die_with_parent, initargs=(os.getpid(), inherited))

    def map(self, batches: Iterator[list[Row]]) -> Iterator[Encoded]:
        """The batches encoded, in order, with at most IN_FLIGHT x workers of them queued."""
        if self.pool is None:
            yield from (encode_rows(b, *self.args) for b in batches)
            return
        pending: collections.deque[Any] = collections.deque()
        for batch in batches:
            pending.append(self.pool.apply_async(encode_rows, (batch, *self.args)))
            if len(pending) >= IN_FLIGHT * self.nproc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.pool is not None:
            if kind is None:
                self.pool.close()
            else:  # an error or a signal: stop the workers now, not after their queue
                self.pool.terminate()
            self.pool.join()
            if self._saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = self._saved


def quiet_datasets() -> None:
    """datasets' own progress bars only on a terminal; our one-line summaries say the rest."""
    import datasets

    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
