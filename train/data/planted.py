"""A corpus of distinct documents with planted near-duplicates: what dedup is measured on (issue 23's
"Planted duplicates"), by the tests (tests/test_curation_dedup.py) and the benchmark (bench/dedup.py) alike.

Distinct documents are real sentences from ../shared/data/corpora, drawn at random into documents of
8-40 sentences, so that two of them share little beyond common phrasing. A planted copy differs from its
original as the same article does across web pages: a boilerplate line added, two sentences swapped and
up to 3% of its words replaced by other words of the corpus (`changed` words; 3% unless told).
Everything follows from the seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOILERPLATE = (
    "Share this article: Facebook | Twitter | Email",
    "Subscribe to our newsletter for the latest updates.",
    "Copyright (c) All rights reserved. Terms of use and privacy policy.",
    "Click here to read more stories like this one.",
    "Advertisement - continue reading below",
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PlantedDoc:
    text: str
    cluster: int
    """The distinct document it is, or is a copy of: a correct dedup keeps exactly one per cluster."""
    copy: bool


def sentences(corpora: Path) -> list[str]:
    """The corpora's sentences of 6 to 60 words, each once, in file order."""
    seen: dict[str, None] = {}
    for path in sorted(corpora.glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        for s in _SENTENCE.split(text):
            if 6 <= len(s.split()) <= 60:
                seen.setdefault(s, None)
    return list(seen)


class Planted:
    """Documents drawn from a sentence pool; `docs(n, copy_rate)` yields them with the copies interleaved."""

    def __init__(self, pool: list[str], seed: int = 0, *, changed: float = 0.03) -> None:
        self.pool = pool
        self.vocab = sorted({w for s in pool[:5000] for w in s.split()})
        self.rng = np.random.default_rng(seed)
        self.changed = changed

    def original(self) -> str:
        k = int(self.rng.integers(8, 41))
        return " ".join(self.pool[i] for i in self.rng.integers(0, len(self.pool), k))

    def copy(self, text: str) -> str:
        """text with a boilerplate line added, two sentences swapped and `changed` of its words replaced."""
        sents = _SENTENCE.split(text)
        if len(sents) >= 2:
            i, j = self.rng.choice(len(sents), 2, replace=False)
            sents[i], sents[j] = sents[j], sents[i]
        words = " ".join(sents).split(" ")
        for k in self.rng.choice(len(words), int(len(words) * self.changed), replace=False):
            words[k] = self.vocab[int(self.rng.integers(len(self.vocab)))]
        line = BOILERPLATE[int(self.rng.integers(len(BOILERPLATE)))]
        body = " ".join(words)
        return f"{line}\n{body}" if self.rng.random() < 0.5 else f"{body}\n{line}"

    def docs(self, n: int, copy_rate: float = 0.3, max_copies: int = 3) -> Iterator[PlantedDoc]:
        """n distinct documents; each, with probability copy_rate, followed later by 1..max_copies copies."""
        pending: list[PlantedDoc] = []
        for c in range(n):
            text = self.original()
            yield PlantedDoc(text, c, False)
            if self.rng.random() < copy_rate:
                for _ in range(int(self.rng.integers(1, max_copies + 1))):
                    pending.append(PlantedDoc(self.copy(text), c, True))
            if pending and self.rng.random() < 0.5:  # copies arrive later, some much later
                yield pending.pop(int(self.rng.integers(len(pending))))
        yield from pending


def write_jsonl(docs: Iterator[PlantedDoc], path: Path, *, max_bytes: float = float("inf")) -> list[PlantedDoc]:
    """Write the documents as JSONL ({"text": ...} per line) up to max_bytes; return the clusters and copy
    flags of those written, in order, with their text left empty to bound memory."""
    out: list[PlantedDoc] = []
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            line = json.dumps({"text": d.text}) + "\n"
            f.write(line)
            out.append(PlantedDoc("", d.cluster, d.copy))
            size += len(line)
            if size >= max_bytes:
                break
    return out
