"""Words and word n-grams as GPT-3's Appendix C counts them: what decontamination (`scalegpt prepare`)
removes from training text and what the contamination report (`scalegpt eval --contamination`) looks
up, so that the two agree on every gram.

A word is a whitespace-separated token, lowercased, with its punctuation removed (a token of punctuation
alone is no word). A gram is hashed to 64 bits: each word by blake2b, then the words in order through
splitmix64, so a gram's hash is a vectorized function of its words' hashes and millions of grams cost
a few numpy passes.

N per task: for natural-language text the paper's rule (`paper_n`); for the built-in synthetic tasks
(train/evaluation/tasks.py), WHOLE: each example is one gram, answer included. Their lines are 3 to 8
words, shorter than any N the paper allows, and any shorter gram ("q what is 12", or 3 words of a 6-word
scramble line) would mark nearly every example dirty without saying whether the problem was seen.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np

from .sampling import mix64

PAPER_MIN_N, PAPER_MAX_N = 8, 13
WHOLE = 0
"""A task's N meaning "each example is one gram, however many words it has"."""

_PUNCT = re.compile(r"[^\w\s]|_")
_TOKEN = re.compile(r"\S+")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _word(token: str) -> str:
    return _PUNCT.sub("", token.lower())


def words(text: str) -> list[str]:
    """Appendix C's words: lowercased, punctuation removed, split on whitespace."""
    return [w for t in text.split() if (w := _word(t))]


def word_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """words(text), and where each word's token starts and ends in text (character offsets)."""
    out, spans = [], []
    for m in _TOKEN.finditer(text):
        if w := _word(m.group()):
            out.append(w)
            spans.append(m.span())
    return out, spans


class WordHasher:
    """64-bit hashes of words (blake2b), remembered for the words seen, up to a bound."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self._seen: dict[str, int] = {}
        self._limit = limit

    def __call__(self, ws: Sequence[str]) -> np.ndarray:
        seen = self._seen
        if len(seen) > self._limit:
            seen.clear()
        out = np.empty(len(ws), dtype=np.uint64)
        for i, w in enumerate(ws):
            h = seen.get(w)
            if h is None:
                h = seen[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def gram_hashes(word_hashes: np.ndarray, n: int, doc_lengths: Sequence[int] | None = None) -> np.ndarray:
    """The hash of every run of n consecutive words, in order of their first word; with doc_lengths
    (words per document, summing to len(word_hashes)) the runs that span two documents are left out."""
    m = len(word_hashes) - n + 1
    if n < 1 or m < 1:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = mix64(word_hashes + _GOLDEN)
        acc = np.full(m, np.uint64(n), dtype=np.uint64)
        for j in range(n):
            acc = mix64(acc ^ mixed[j : j + m])
    if doc_lengths is None:
        return acc
    doc = np.repeat(np.arange(len(doc_lengths)), np.asarray(doc_lengths, dtype=np.int64))
    return acc[doc[:m] == doc[n - 1 :]]


def paper_n(lengths: Sequence[int]) -> int:
    """Appendix C's N for a natural-language task: the 5th percentile of its example lengths in words,
    at least 8 and at most 13."""
    if not len(lengths):
        return PAPER_MAX_N
    return int(min(PAPER_MAX_N, max(PAPER_MIN_N, math.floor(np.percentile(np.asarray(lengths), 5)))))


def gram_length(n: int, example_words: int) -> int:
    """The gram length an example of this many words is looked up with: n, or the whole example when
    it is shorter than n or n is WHOLE."""
    return example_words if n == WHOLE else min(n, example_words)


def example_grams(texts: Sequence[str], n: int, hasher: WordHasher | None = None) -> list[tuple[int, np.ndarray]]:
    """For each example: (its gram length, the hashes of its grams of that length). Examples of one gram
    length are hashed together, since numpy's cost is per call, not per gram."""
    hasher = hasher or WordHasher()
    per = [words(t) for t in texts]
    out: list[tuple[int, np.ndarray]] = [(0, np.empty(0, dtype=np.uint64))] * len(per)
    groups: dict[int, list[int]] = {}
    for i, ws in enumerate(per):
        groups.setdefault(gram_length(n, len(ws)), []).append(i)
    for g, members in groups.items():
        if g == 0:
            continue
        lengths = [len(per[i]) for i in members]
        grams = gram_hashes(hasher([w for i in members for w in per[i]]), g, lengths)
        counts = np.array(lengths) - g + 1
        for i, part in zip(members, np.split(grams, np.cumsum(counts)[:-1]), strict=True):
            out[i] = (g, part)
    return out


def task_n(task_name: str) -> int:
    """N for a built-in task: WHOLE (see above); every built-in task is synthetic."""
    del task_name
    return WHOLE
