"""Decontamination as a prepare step (GPT-3 Appendix C): the training text that overlaps evaluation tasks
is cut out of a source before it is tokenized.

A match is an occurrence of one of a task's test grams, with the words and the N per task of
train/data/ngrams.py, the same as `scalegpt eval --contamination` looks up, so that after this step the
report finds none of the removed queries. Each match removes `window` characters on each side of it,
widened to whole words, which splits the document into pieces: a piece shorter than `min_piece`
characters is dropped, a document split into more than `max_pieces` pieces is dropped whole, and each
piece kept becomes a document of its own (no gram spans two of them, in training or in the report).

The paper also ignored a 13-gram that matched more than 10 training documents, as common phrasing. The
built-in tasks are looked up whole (each test query is one gram, answer included), and such a gram is the
test item itself, however often it occurs, so every match is removed. The rule belongs to n-grams of
longer natural-language examples, such as those of a `texts:` file, and is not applied to them yet: there,
a common phrase of 8 to 13 words that a benchmark shares with many training documents is removed too.

Every decision depends on the document alone, so it is the same whatever the order of documents, the
number of workers, or a resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...evaluation.tasks import get_tasks, queries
from ..curation import DecontaminateConfig
from ..ngrams import WordHasher, example_grams, gram_hashes, paper_n, task_n, word_spans, words
from ..sources import Fragment, document_batches

VERSION = 1
"""Part of a source's settings: bump when the step removes other text from the same input."""


@dataclass
class DecontaminationStats:
    """What the step did to one source, for the prepare log and the manifest."""

    documents: int = 0
    bytes: int = 0
    """UTF-8 bytes of the documents in, as every curation step counts them (curation_report.py)."""
    matches: int = 0
    touched: int = 0
    """Documents with at least one match."""
    dropped: int = 0
    """Documents dropped whole (more than max_pieces pieces, or no piece long enough)."""
    pieces: int = 0
    """Documents written: untouched documents and the pieces kept of touched ones."""
    bytes_kept: int = 0

    def row(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.matches:,} matches in {self.touched:,} of {self.documents:,} documents; {self.dropped:,} "
            f"dropped whole; {self.pieces:,} documents kept; {self.bytes / 1e6:.2f} -> {self.bytes_kept / 1e6:.2f} MB"
        )


def text_examples(path: str, key: str) -> list[str]:
    """The examples of a `texts:` file, or a UserError naming the setting."""
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}.texts: {path} cannot be read ({exc}); point it at a UTF-8 file of examples") from None
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        try:
            lines = [str(json.loads(line)["text"]) for line in lines]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f'{key}.texts: {path} is not JSON lines with a "text" field each ({exc!r})') from None
    if not lines:
        raise UserError(f"{key}.texts: {path} holds no example; give a file with one example per line")
    return lines


def check(cfg: DecontaminateConfig, key: str) -> list[str]:
    """The canonical task names, or a UserError naming the setting (before prepare writes anything)."""
    if not cfg.tasks and not cfg.texts:
        return []
    try:
        tasks = [t.name for t in get_tasks(list(cfg.tasks))] if cfg.tasks else []
    except UserError as exc:
        raise UserError(f"{key}.tasks: {exc}") from None
    for path in cfg.texts:
        text_examples(path, key)
    for name, value, low in (("num_examples", cfg.num_examples, 1), ("window", cfg.window, 0)):
        if value < low:
            raise UserError(f"{key}.{name} must be at least {low}, got {value}")
    for name, value in (("min_piece", cfg.min_piece), ("max_pieces", cfg.max_pieces)):
        if value < 0:
            raise UserError(f"{key}.{name} must be at least 0, got {value}")
    return tasks


def settings(cfg: DecontaminateConfig, key: str) -> dict[str, Any] | None:
    """What goes into the source's settings (so a change re-prepares it), or None when the step is off."""
    tasks = check(cfg, key)
    if not tasks and not cfg.texts:
        return None
    texts = {path: hashlib.sha256("\n".join(text_examples(path, key)).encode()).hexdigest() for path in cfg.texts}
    row = {**asdict(cfg), "tasks": tasks, "version": VERSION}
    if texts:  # only when set, so that earlier manifests stay up to date
        row["texts"] = texts
    else:
        del row["texts"]
    return row


@dataclass
class Decontaminator:
    """The test grams of some tasks, by gram length, and the rule that cuts them out of documents."""

    cfg: DecontaminateConfig
    targets: dict[int, np.ndarray]
    """Gram length -> the sorted hashes of the tasks' test grams of that length."""
    stats: DecontaminationStats = field(default_factory=DecontaminationStats)
    hasher: WordHasher = field(default_factory=WordHasher)

    @classmethod
    def of(cls, cfg: DecontaminateConfig, key: str) -> Decontaminator | None:
        tasks = check(cfg, key)
        if not tasks and not cfg.texts:
            return None
        found: dict[int, list[np.ndarray]] = {}
        hasher = WordHasher()
        sets = [([ex.line for ex in queries(t, cfg.num_examples, cfg.seed)], task_n(t.name)) for t in get_tasks(tasks)]
        for path in cfg.texts:
            examples = text_examples(path, key)
            sets.append((examples, paper_n([len(words(e)) for e in examples])))
        for lines, n in sets:
            for g, hashes in example_grams(lines, n, hasher):
                if g > 0:
                    found.setdefault(g, []).append(hashes)
        targets = {g: np.unique(np.concatenate(parts)) for g, parts in found.items()}
        return cls(cfg, targets, hasher=hasher)

    def cut(self, doc: str) -> list[str]:
        """The pieces of doc to keep: [doc] itself when nothing matches."""
        return self.cut_many([doc])[0]

    def cut_many(self, docs: Sequence[str]) -> list[list[str]]:
        """cut() of each document, hashed together (numpy's cost is per call): the same pieces as one by one."""
        per = [word_spans(d) for d in docs]
        lengths = np.array([len(ws) for ws, _ in per], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        doc_of = np.repeat(np.arange(len(docs)), lengths)
        hashes = self.hasher([w for ws, _ in per for w in ws])
        removed: list[list[tuple[int, int]]] = [[] for _ in docs]
        for g, target in self.targets.items():
            grams = gram_hashes(hashes, g)  # across documents too; those are masked out below
            if not len(grams):
                continue
            at = np.minimum(np.searchsorted(target, grams), len(target) - 1)  # np.isin re-sorts target each call
            hit = (target[at] == grams) & (doc_of[: len(grams)] == doc_of[g - 1 :])
            for i in np.flatnonzero(hit).tolist():
                d = int(doc_of[i])
                spans = per[d][1]
                first, last = spans[i - starts[d]][0], spans[i - starts[d] + g - 1][1]
                removed[d].append(self._widen(docs[d], first - self.cfg.window, last + self.cfg.window))
        return [self._pieces(doc, r) for doc, r in zip(docs, removed, strict=True)]

    def _pieces(self, doc: str, removed: list[tuple[int, int]]) -> list[str]:
        """What is left of doc once the ranges are removed, by the piece rules; counted into stats."""
        self.stats.documents += 1
        size = len(doc.encode())
        self.stats.bytes += size
        if not removed:
            self.stats.pieces += 1
            self.stats.bytes_kept += size
            return [doc]
        self.stats.matches += len(removed)
        self.stats.touched += 1
        pieces, at = [], 0
        for a, b in sorted(removed):
            if a > at:
                pieces.append(doc[at:a])
            at = max(at, b)
        pieces.append(doc[at:])
        pieces = [p.strip() for p in pieces if p.strip()]
        kept = [] if len(pieces) > self.cfg.max_pieces else [p for p in pieces if len(p) >= self.cfg.min_piece]
        self.stats.dropped += not kept
        self.stats.pieces += len(kept)
        self.stats.bytes_kept += sum(len(p.encode()) for p in kept)
        return kept

    @staticmethod
    def _widen(doc: str, a: int, b: int) -> tuple[int, int]:
        """[a, b) clipped to doc and widened to whitespace, so that every piece left is made of whole words."""
        a, b = max(0, a), min(len(doc), b)
        while a > 0 and not doc[a - 1].isspace():
            a -= 1
        while b < len(doc) and not doc[b].isspace():
            b += 1
        return a, b

    def apply(self, frags: Iterator[Fragment]) -> Iterator[Fragment]:
        """The source's fragments with each document (joined from its fragments) cut, each piece kept as a
        document of its own. Documents go through cut_many about a megabyte at a time."""
        for batch in document_batches(frags):
            yield from self._emit(batch)

    def _emit(self, batch: list[str]) -> Iterator[Fragment]:
        for pieces in self.cut_many(batch) if batch else []:
            for piece in pieces:
                yield piece, True
