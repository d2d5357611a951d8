"""Deduplication as a prepare step (GPT-3 Appendix A): exact and fuzzy (MinHash LSH) duplicate documents
are removed from a source before it is tokenized, within the source and against earlier-ranked sources.

A document's words are its text lowercased and split on whitespace (as Spark's Tokenizer, which the paper
used, does). Exact: two documents are the same when their words are, that is when their texts are equal once
lowercased, with every run of whitespace one space and the ends stripped. Fuzzy: a document is the set of its
shingles, runs of `shingle` words (a document with fewer words is one shingle); `num_hashes`
MinHash values (rensa's Rust kernel, chosen by bench/dedup.py) are cut into `bands` bands, and documents
sharing a band are candidates. A candidate pair is a duplicate when its estimated Jaccard similarity (the
fraction of equal MinHash values) is at least `threshold`.

The keep rule depends on the set of documents alone, never on their order, the number of workers or a
resume: each document's rank is its normalized text's 64-bit hash (then the raw text's, among exact
copies). Within a source, each LSH bucket links its members to its lowest-ranked member when their
estimated Jaccard passes the threshold; each connected cluster keeps its lowest-ranked document. A
document that matches a kept document of an earlier source in `against` is dropped before that, and so
are its exact copies.

Memory stays bounded: a first pass spools the documents to the scratch folder and writes each one's
signature and band keys there, the keys partitioned by their top bits into KEY_PARTITIONS files handled one
at a time, and its hashes likewise. Deciding holds the arrays that are read and written by document number
in no order (rank, link, keep, reason and the union-find's parent: 14 bytes a document, 9 MB at 656k
documents; mapped from a file they would be as resident); everything else it holds is of a fixed size
(signatures compared _SIG_CHUNK pairs at a time, drops applied a slice of documents at a time) or a key
partition's worth. Then only the sample's reasons and links are kept, and the second pass reads the spool
back and yields the documents kept (holding rank, reused as the index's numbering, and keep: 5 bytes a
document). With the heap trimmed as it goes, the step's peak is the first pass's batches (~113 MB) up to
2 GB of input. A deduplicated source's index (its kept documents' band keys, signatures,
hashes and excerpts) is then written, as a folder renamed into place, to data.dir/curation/<source>.dedup,
where a later source deduplicated against it reads it; its fingerprint is part of that source's settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ..curation import DedupConfig
from ..ngrams import gram_hashes
from ..sampling import mix64
from ..sources import Fragment, document_batches
from .staged import Staged
from .workers import _TRIM  # glibc's malloc_trim: the one owner of it in prepare

VERSION = 1
"""Part of a source's settings: bump when the step keeps other documents of the same input."""
SEED = 1234
"""MinHash seed: fixed, so that indexes of different sources are comparable."""
KEY_PARTITIONS = 256
"""Band-key files: each holds 1/256 of a source's keys (12 bytes a key), so one in memory stays small."""
DOC_PARTITIONS = 64
"""Files of (normalized-text hash, raw-text hash, document) records, by the hash's top bits."""
_TRIM_EVERY = 8
"""Batches of the first pass, or key partitions, between two trims of the heap (each costs a few milliseconds)."""
_BATCH_CHARS = 1 << 20
"""Characters of documents hashed together: rensa's and numpy's per-call cost amortized, memory bounded."""
_RECORD = np.dtype([("key", "<u8"), ("doc", "<u4")])
_DOC = np.dtype([("chash", "<u8"), ("raw", "<u4"), ("doc", "<u4")])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
EXCERPT = 160
"""Characters of a document kept as its excerpt in the index and the sample of dropped documents."""
EXCERPT_BYTES = 256
"""Bytes of each excerpt in the index's excerpts.bin (UTF-8, cut at a character, zero-padded)."""
SAMPLES = 100
"""Dropped documents described in dropped.jsonl: those of lowest rank, so the sample is order-independent."""
INDEX_SUFFIX = ".dedup"


def rensa_version() -> int:
    """rensa's hashing algorithm version: part of the settings, so a rensa that hashes differently re-prepares."""
    import rensa  # here, not at the top: loading a config needs no Rust extension

    return int(rensa.RMinHash.ALGORITHM_VERSION)


def check(cfg: DedupConfig, key: str, names: Sequence[str], index: int) -> bool:
    """Whether the step is on, or a UserError naming the setting (before prepare writes anything). names are
    data.sources' names in config order; against must name sources ranked before this one."""
    for name in ("shingle", "num_hashes", "bands"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{key}.{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.num_hashes % cfg.bands:
        raise UserError(
            f"{key}.bands ({cfg.bands}) must divide {key}.num_hashes ({cfg.num_hashes}); e.g. bands=32 with "
            f"num_hashes=128"
        )
    if not 0.0 <= cfg.threshold <= 1.0:
        raise UserError(f"{key}.threshold must be a Jaccard similarity in [0, 1], got {cfg.threshold}")
    for other in cfg.against:
        if other not in names:
            raise UserError(f"{key}.against names {other!r}, which is not a source; sources: {list(names)}")
        if names.index(other) >= index:
            raise UserError(
                f"{key}.against names {other!r}, which is not ranked before {names[index]!r}: a source is "
                f"deduplicated only against sources earlier in data.sources (the earlier copy is kept)"
            )
    if len(set(cfg.against)) != len(cfg.against):
        raise UserError(f"{key}.against names a source twice: {list(cfg.against)}")
    return cfg.within or bool(cfg.against)


def check_against(cfgs: Sequence[DedupConfig], names: Sequence[str]) -> None:
    """Each source named in an `against` is deduplicated itself, with the same hashing (so its index exists
    and is comparable)."""
    for i, cfg in enumerate(cfgs):
        key = f"data.sources.{i}.curation.dedup.against"
        for other in cfg.against:
            j = list(names).index(other)
            theirs = cfgs[j]
            if not (theirs.within or theirs.against):
                raise UserError(
                    f"{key} names {other!r}, which is not deduplicated itself; set "
                    f"data.sources.{j}.curation.dedup.within=true"
                )
            for name in ("shingle", "num_hashes", "bands"):
                if getattr(theirs, name) != getattr(cfg, name):
                    raise UserError(
                        f"{key} names {other!r}, whose curation.dedup.{name} is {getattr(theirs, name)}, "
                        f"not {getattr(cfg, name)}: documents are compared only with the same hashing"
                    )


def signature_settings(cfg: DedupConfig) -> dict[str, Any]:
    """What a document's signature and band keys are a function of (staged results are kept under it)."""
    what = {"shingle": cfg.shingle, "num_hashes": cfg.num_hashes, "bands": cfg.bands, "seed": SEED}
    return {**what, "rensa": rensa_version(), "version": VERSION}


def settings(cfg: DedupConfig, against: dict[str, str]) -> dict[str, Any]:
    """What goes into the source's settings: a change re-prepares it. against: name -> that index's fingerprint."""
    return {**asdict(cfg), "against": against, "seed": SEED, "rensa": rensa_version(), "version": VERSION}


def index_path(data_dir: Path, file_stem: str) -> Path:
    return data_dir / "curation" / f"{file_stem}{INDEX_SUFFIX}"


@dataclass(frozen=True)
class DedupJob:
    """What one source's step needs from the plan: its settings, where its index goes and the indexes it reads."""

    cfg: DedupConfig
    index: Path
    fingerprint: str
    """What the index is a function of (the source's inputs and settings), stored in its meta.json."""
    against: list[tuple[str, Path, str]] = field(default_factory=list)
    """(source name, index folder, expected fingerprint) of each earlier source, in the config's order."""
    staged: Staged | None = None
    """Signatures computed ahead by `scalegpt curate` (staged.py), looked up instead of computed."""


def read_meta(index: Path) -> dict[str, Any] | None:
    try:
        return json.loads((index / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def index_ok(job: DedupJob | None) -> bool:
    """Whether the source's index is in place and made from the same inputs and settings (or no index is due)."""
    if job is None:
        return True
    meta = read_meta(job.index)
    return meta is not None and meta.get("fingerprint") == job.fingerprint


@dataclass
class DedupStats:
    """What the step did to one source, for the prepare log and the manifest."""

    documents: int = 0
    bytes: int = 0
    kept: int = 0
    bytes_kept: int = 0
    dropped_exact: int = 0
    """Identical (after whitespace normalization) to a kept document of this source."""
    dropped_fuzzy: int = 0
    """In a MinHash cluster of this source whose kept document is another."""
    dropped_against: dict[str, int] = field(default_factory=dict)
    """Per earlier source: documents that duplicate one of its kept documents."""
    samples: str = ""
    """The file, relative to data.dir, that describes up to SAMPLES dropped documents (one JSON line each)."""

    def row(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        against = "".join(f", {n:,} against {s}" for s, n in self.dropped_against.items())
        return (
            f"{self.kept:,} of {self.documents:,} documents kept ({self.bytes / 1e6:.2f} -> "
            f"{self.bytes_kept / 1e6:.2f} MB); dropped {self.dropped_exact:,} exact, {self.dropped_fuzzy:,} "
            f"fuzzy{against}"
        )


def _trim() -> None:
    if _TRIM is not None:
        _TRIM(0)


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _sequence_hash(word_hashes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per document, a 64-bit hash of its word sequence (so of normalize(text)): each word's hash mixed with
    its position, summed, then mixed with the length. Computed from the word hashes, it costs no second pass
    over the text."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pos = np.arange(len(word_hashes), dtype=np.uint64) - np.repeat(starts, lengths).astype(np.uint64)
    with np.errstate(over="ignore"):
        vals = mix64(word_hashes ^ mix64(pos + _GOLDEN))
        sums = np.zeros(len(lengths), dtype=np.uint64)
        some = lengths > 0
        if some.any():
            sums[some] = np.add.reduceat(vals, starts[some])
        return mix64(sums ^ mix64(lengths.astype(np.uint64)))


def normalize(text: str) -> str:
    """The text exact dedup compares: lowercased, every run of whitespace one space, the ends stripped."""
    return " ".join(text.lower().split())


@dataclass
class Signatures:
    """One batch of documents hashed: their ranks' parts, sizes, MinHash signatures and band keys."""

    chash: np.ndarray
    rawhash: np.ndarray
    nbytes: np.ndarray
    sig: np.ndarray
    """(documents, num_hashes) uint32."""
    keys: np.ndarray
    """(documents, bands) uint64: a band's key mixes its index with its hashes, so bands never collide."""
    raw: list[bytes]
    """The documents in UTF-8."""


def signatures(docs: Sequence[str], cfg: DedupConfig) -> Signatures:
    """Hash a batch of documents (see the module docstring for the shingles)."""
    import rensa  # here, not at the top: loading a config needs no Rust extension

    words = [d.lower().split() for d in docs]  # one split per document: it is most of the step's time
    raw = [d.encode("utf-8") for d in docs]
    rawhash = np.array([_h64(r) for r in raw], dtype=np.uint64)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    word_hashes = np.fromiter(
        itertools.chain.from_iterable(rensa.RMinHash.hash_token_sets(words)), dtype=np.uint64, count=int(lengths.sum())
    )
    chash = _sequence_hash(word_hashes, lengths)
    n = cfg.shingle
    counts = np.maximum(lengths - n + 1, 0)
    grams = gram_hashes(word_hashes, n, lengths)  # only runs inside one document, in document order
    per_doc = np.where(counts > 0, counts, 1)  # a document shorter than a shingle is one token: its hash
    offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.uint64)
    tokens = np.empty(int(offsets[-1]), dtype=np.uint64)
    long = counts > 0
    gram_start = np.concatenate([[0], np.cumsum(counts[long])[:-1]]).astype(np.int64)
    at = np.repeat(offsets[:-1][long].astype(np.int64) - gram_start, counts[long]) + np.arange(len(grams))
    tokens[at] = grams
    tokens[offsets[:-1][~long].astype(np.int64)] = chash[~long]
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(tokens, offsets, cfg.num_hashes, SEED)
    sig = np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(docs), cfg.num_hashes)
    rows = cfg.num_hashes // cfg.bands
    bands = sig.reshape(len(docs), cfg.bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = np.broadcast_to(mix64(np.arange(cfg.bands, dtype=np.uint64) + _GOLDEN), bands.shape[:2]).copy()
        for j in range(rows):
            acc = mix64(acc ^ (bands[:, :, j] + _GOLDEN))
    return Signatures(chash, rawhash, np.array([len(r) for r in raw], dtype=np.int64), sig, acc, raw)


STAGED = ("chash", "rawhash", "sig", "keys")
"""The arrays of Signatures that `scalegpt curate` stages (the rest follow from the text)."""


def looked_up(docs: Sequence[str], staged: Staged) -> Signatures:
    """signatures() of a batch from staged results: the same arrays, read instead of computed."""
    rows = staged.rows(docs)
    got = {name: np.asarray(staged.arrays[name][rows]) for name in STAGED}
    raw = [d.encode("utf-8") for d in docs]
    nbytes = np.array([len(r) for r in raw], dtype=np.int64)
    return Signatures(got["chash"], got["rawhash"], nbytes, got["sig"], got["keys"], raw)


class _Partitions:
    """Records appended to `count` files by the top bits of one 64-bit field, so that each file holds a
    fraction of a source's records and is read alone."""

    def __init__(self, folder: Path, prefix: str, count: int, field_: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"{prefix}-{p:03d}.bin" for p in range(count)]
        self.files = [open(p, "wb") for p in self.paths]
        self.shift = np.uint64(64 - (count.bit_length() - 1))
        self.field = field_

    def add(self, rec: np.ndarray) -> None:
        part = (rec[self.field] >> self.shift).astype(np.int64)
        order = np.argsort(part, kind="stable")
        rec, part = rec[order], part[order]
        bounds = np.searchsorted(part, np.arange(len(self.files) + 1))
        for p, f in enumerate(self.files):
            if bounds[p + 1] > bounds[p]:
                f.write(rec[bounds[p] : bounds[p + 1]].tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()


def _read(path: Path, dtype: np.dtype) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


class _SigFile:
    """Signature rows read by document number with pread, so that only the rows asked for are in memory."""

    def __init__(self, path: Path, num_hashes: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.row = num_hashes * 4
        self.num_hashes = num_hashes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.num_hashes), dtype=np.uint32)
        for k, i in enumerate(ids.tolist()):
            out[k] = np.frombuffer(os.pread(self.fd, self.row, i * self.row), dtype=np.uint32)
        return out

    def close(self) -> None:
        os.close(self.fd)


_PAIR_CHUNK = 8192
_SIG_CHUNK = 1024
"""Pairs whose signatures are in memory at once (0.5 KB a row, four copies): a fixed 2 MB, so that the step's
peak does not follow how many candidates a key partition yields."""


def _jaccard(a: _SigFile, b: _SigFile, pairs: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each (row in a, row in b) pair, reading a chunk of rows at a time."""
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), _SIG_CHUNK):
        chunk = pairs[s : s + _SIG_CHUNK]
        ua, ia = np.unique(chunk[:, 0], return_inverse=True)
        ub, ib = np.unique(chunk[:, 1], return_inverse=True)
        out[s : s + len(chunk)] = (a.rows(ua)[ia] == b.rows(ub)[ib]).mean(axis=1)
    return out


def _bucket_pairs(rec: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """(first, member) pairs of documents sharing a key: each member linked to its bucket's lowest-ranked one."""
    if len(rec) < 2:
        return np.empty((0, 2), dtype=np.int64)
    docs = rec["doc"].astype(np.int64)
    order = np.lexsort((rank[docs], rec["key"]))
    keys, docs = rec["key"][order], docs[order]
    start = np.concatenate([[True], keys[1:] != keys[:-1]])
    first = np.maximum.accumulate(np.where(start, np.arange(len(keys)), 0))
    member = ~start
    return np.stack([docs[first[member]], docs[member]], axis=1)


def _pack(pairs: np.ndarray) -> np.ndarray:
    return (pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64)


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.stack([(packed >> np.uint64(32)).astype(np.int64), (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)], 1)


def _pair_set(chunks: Iterator[np.ndarray]) -> np.ndarray:
    """The distinct pairs of all chunks, as packed (a << 32 | b) uint64, merged as they come: a pair found in
    many bands is held once, so memory follows the distinct pairs, not the band count."""
    acc = np.empty(0, dtype=np.uint64)
    pending: list[np.ndarray] = []
    size = 0
    for pairs in chunks:
        pending.append(np.unique(_pack(pairs)))
        size += len(pending[-1])
        if size > max(len(acc), 1 << 16):
            acc, pending, size = np.unique(np.concatenate([acc, *pending])), [], 0
    return np.unique(np.concatenate([acc, *pending]))


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The union-find roots of some nodes, vectorized over them (no array as long as the whole forest)."""
    roots = parent[nodes]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


class Deduplicator:
    """The step for one source: `apply(fragments)` yields the kept documents, in their order of arrival.

    In memory stay a few numbers per document (rank, link, keep, reason and, while clustering, the
    union-find: 14 bytes a document, 5 once decided); the rest is read from the scratch folder a partition
    or a chunk at a time."""

    def __init__(self, job: DedupJob, name: str, work: Path, data_dir: Path) -> None:
        self.job, self.cfg, self.name = job, job.cfg, name
        self.work, self.data_dir = work, data_dir
        self.stats = DedupStats()

    # pass 1 ----------------------------------------------------------------------------------------------
    def _spool(self, frags: Iterator[Fragment]) -> int:
        """Write every document to the spool, its signature to sigs.u32, its band keys to the key partitions
        and its hashes to the document partitions; return the number of documents."""
        keys = _Partitions(self.work / "keys", "keys", KEY_PARTITIONS, "key")
        docs = _Partitions(self.work / "docs", "docs", DOC_PARTITIONS, "chash")
        n = batches = 0
        with open(self.work / "spool.bin", "wb") as spool, open(self.work / "sigs.u32", "wb") as sigs:

            def flush(batch: list[str]) -> None:
                nonlocal n, batches
                if not batch:
                    return
                s = signatures(batch, self.cfg) if self.job.staged is None else looked_up(batch, self.job.staged)
                spool.write(b"".join(part for data in s.raw for part in (len(data).to_bytes(8, "little"), data)))
                sigs.write(s.sig.tobytes())
                ids = np.arange(n, n + len(batch), dtype=np.uint32)
                rec = np.empty(s.keys.size, dtype=_RECORD)
                rec["key"], rec["doc"] = s.keys.ravel(), np.repeat(ids, s.keys.shape[1])
                keys.add(rec)
                doc = np.empty(len(batch), dtype=_DOC)
                doc["chash"], doc["raw"], doc["doc"] = s.chash, s.rawhash.astype(np.uint32), ids
                docs.add(doc)
                self.stats.bytes += int(s.nbytes.sum())
                n += len(batch)
                batches += 1
                if batches % _TRIM_EVERY == 0:
                    _trim()  # without it the heap creeps up with the number of batches, as workers.py says

            for batch in document_batches(frags, _BATCH_CHARS):
                flush(batch)
        keys.close()
        docs.close()
        self.keys, self.docs = keys.paths, docs.paths
        self.stats.documents = n
        return n

    # decisions -------------------------------------------------------------------------------------------
    def _rank(self, n: int) -> None:
        """self.rank: each document's place in (normalized-text hash, raw-text hash) order; self.link: the
        lowest-ranked document with the same words (itself for the representative of its exact group). The
        document partitions are rewritten sorted, so reading them in turn is reading in rank order."""
        self.rank = np.empty(n, dtype=np.int32)  # a few bytes a document stay in memory, no more
        self.link = np.empty(n, dtype=np.int32)
        self.is_rep = np.zeros(n, dtype=bool)
        offset = 0
        for path in self.docs:  # partitions by the hash's top bits: partition order is hash order
            rec = _read(path, _DOC)
            rec = rec[np.lexsort((rec["raw"], rec["chash"]))]
            docs = rec["doc"].astype(np.int64)
            self.rank[docs] = np.arange(offset, offset + len(rec), dtype=np.int32)
            start = np.concatenate([[True], rec["chash"][1:] != rec["chash"][:-1]]) if len(rec) else np.empty(0, bool)
            self.link[docs] = docs[np.maximum.accumulate(np.where(start, np.arange(len(rec)), 0))]
            self.is_rep[docs[start]] = True
            offset += len(rec)
            rec.tofile(path)

    def _decide(self, n: int) -> None:
        """self.keep and self.reason (0 kept, 1 exact, 2 fuzzy, 3 + k against the k-th source); self.link
        becomes, for a dropped document, the one it duplicates (in this source, or in the other's index)."""
        self._rank(n)
        is_rep = self.is_rep
        del self.is_rep
        self.keep = np.ones(n, dtype=bool)
        self.reason = np.zeros(n, dtype=np.int8)
        sigs = _SigFile(self.work / "sigs.u32", self.cfg.num_hashes)
        try:
            for k, (other, folder, fingerprint) in enumerate(self.job.against):
                hit, who = self._against(folder, fingerprint, other, sigs, is_rep & self.keep)
                matched = np.zeros(n, dtype=bool)
                matched[hit] = True
                dropped = np.flatnonzero(matched[self.link] & self.keep)  # the whole exact group goes
                self.link[dropped] = who[np.searchsorted(hit, self.link[dropped])]
                self.keep[dropped] = False
                self.reason[dropped] = 3 + k
                self.stats.dropped_against[other] = len(dropped)
                del matched
            if self.cfg.within:
                exact = self.keep & ~is_rep
                self.keep[exact] = False
                self.reason[exact] = 1
                self.stats.dropped_exact = int(exact.sum())
                del exact, is_rep  # the kept documents are the representatives now
                _trim()
                self.stats.dropped_fuzzy = self._drop_fuzzy(sigs)
        finally:
            sigs.close()

    def _against(
        self, folder: Path, fingerprint: str, other: str, sigs: _SigFile, alive: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The documents (sorted) that duplicate a kept document of the other source's index, and for each
        the one it is most like there (the lowest-numbered, so lowest-ranked, among equals)."""
        meta = read_meta(folder)
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise UserError(
                f"source {self.name!r} is deduplicated against {other!r}, whose index {folder} is missing or "
                f"out of date; re-run `scalegpt prepare` to rebuild it"
            )

        def candidates() -> Iterator[np.ndarray]:
            for path in self.keys:
                ours = _read(path, _RECORD)
                ours = ours[alive[ours["doc"]]]
                idx = _read(folder / "keys" / path.name, _RECORD)  # sorted by (key, doc)
                if not len(ours) or not len(idx):
                    continue
                lo = np.searchsorted(idx["key"], ours["key"], side="left")
                hi = np.searchsorted(idx["key"], ours["key"], side="right")
                m = hi > lo
                counts = (hi - lo)[m]
                a = np.repeat(ours["doc"][m].astype(np.int64), counts)
                yield np.stack([a, idx["doc"][np.repeat(lo[m], counts) + _ranges(counts)].astype(np.int64)], axis=1)

        packed = _pair_set(candidates())
        theirs = _SigFile(folder / "sigs.u32", self.cfg.num_hashes)
        try:
            kept, jacs = [], []
            for s in range(0, len(packed), _PAIR_CHUNK):
                pairs = _unpack(packed[s : s + _PAIR_CHUNK])
                jac = _jaccard(sigs, theirs, pairs)
                ok = jac >= self.cfg.threshold
                kept.append(pairs[ok])
                jacs.append(jac[ok])
        finally:
            theirs.close()
        del packed
        pairs = np.concatenate(kept) if kept else np.empty((0, 2), np.int64)
        jac = np.concatenate(jacs) if jacs else np.empty(0)
        order = np.lexsort((pairs[:, 1], -jac, pairs[:, 0]))  # per document: most similar, then lowest number
        pairs = pairs[order]
        first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]]) if len(pairs) else np.empty(0, bool)
        return pairs[first, 0], pairs[first, 1]

    def _drop_fuzzy(self, sigs: _SigFile) -> int:
        """Drop each kept document in a cluster whose keeper (its lowest-ranked member) is another, linking it to
        that keeper; return how many were dropped.

        One union-find over the source (4 bytes a document), fed a key partition at a time: a candidate pair
        already in one cluster is not verified again, so a pair found in many bands costs one check, and no
        set of pairs is held."""
        alive = self.keep
        n = len(alive)
        parent = np.arange(n, dtype=np.int32)
        for p, path in enumerate(self.keys):
            if p % _TRIM_EVERY == 0:
                _trim()  # each partition's arrays, freed, would otherwise stay in the heap as it grows
            rec = _read(path, _RECORD)
            pairs = _bucket_pairs(rec[alive[rec["doc"]]], self.rank)
            if not len(pairs):
                continue
            pairs = pairs[_roots(parent, pairs[:, 0]) != _roots(parent, pairs[:, 1])]
            for s in range(0, len(pairs), _PAIR_CHUNK):
                chunk = pairs[s : s + _PAIR_CHUNK]
                chunk = chunk[_jaccard(sigs, sigs, chunk) >= self.cfg.threshold]
                for a, b in zip(chunk[:, 0].tolist(), chunk[:, 1].tolist(), strict=True):
                    ra, rb = _find(parent, a), _find(parent, b)
                    if ra != rb:  # the lower-ranked root stays the root, so each root is its cluster's keeper
                        if self.rank[ra] < self.rank[rb]:
                            parent[rb] = ra
                        else:
                            parent[ra] = rb
        dropped = 0
        for s in range(0, n, 1 << 16):  # a slice at a time: no array of the dropped as long as the source
            nodes = np.arange(s, min(n, s + (1 << 16)), dtype=np.int32)
            roots = _roots(parent, nodes)
            moved = roots != nodes
            self.keep[nodes[moved]] = False
            self.reason[nodes[moved]] = 2
            self.link[nodes[moved]] = roots[moved]
            dropped += int(moved.sum())
        return dropped

    # pass 2 ----------------------------------------------------------------------------------------------
    def apply(self, frags: Iterator[Fragment]) -> Iterator[Fragment]:
        """The source's kept documents, whole; the index and the sample are written when the last one is out."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            n = self._spool(frags)
            _trim()  # pass 1's freed batches go back to the system before the decisions allocate
            self._decide(n)
            s = self.stats
            s.kept = int(self.keep.sum())
            sample = {int(d): (int(self.reason[d]), int(self.link[d])) for d in self._sample()}
            del self.reason, self.link  # the rest of the step needs them for the sample alone
            _trim()
            want = set(sample) | {k for r, k in sample.values() if r in (1, 2)}
            index_of = self.rank  # no longer needed: it becomes the kept documents' numbers, in rank order
            index_of[:] = -1
            offset = 0
            for path in self.docs:
                docs = _read(path, _DOC)["doc"]
                docs = docs[self.keep[docs]]
                index_of[docs] = np.arange(offset, offset + len(docs), dtype=np.int32)
                offset += len(docs)
            excerpts: dict[int, str] = {}
            (self.work / "index").mkdir()
            with open(self.work / "index" / "excerpts.bin", "wb") as exc:
                exc.truncate(s.kept * EXCERPT_BYTES)
                for i, (text, size) in enumerate(self._read_spool()):
                    if i in want:
                        excerpts[i] = text[:EXCERPT]
                    if self.keep[i]:
                        s.bytes_kept += size
                        exc.seek(int(index_of[i]) * EXCERPT_BYTES)
                        exc.write(text[:EXCERPT].encode("utf-8")[:EXCERPT_BYTES])
                        yield text, True
            self._write_index(index_of, sample, excerpts)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _sample(self) -> np.ndarray:
        """The SAMPLES dropped documents of lowest rank (the document partitions are in rank order)."""
        out: list[np.ndarray] = []
        left = SAMPLES
        for path in self.docs:
            if left <= 0:
                break
            docs = _read(path, _DOC)["doc"].astype(np.int64)
            dropped = docs[~self.keep[docs]][:left]
            out.append(dropped)
            left -= len(dropped)
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def _read_spool(self) -> Iterator[tuple[str, int]]:
        with open(self.work / "spool.bin", "rb") as f:
            while head := f.read(8):
                size = int.from_bytes(head, "little")
                yield f.read(size).decode("utf-8"), size

    # the index -------------------------------------------------------------------------------------------
    def _write_index(self, index_of: np.ndarray, sample: dict[int, tuple[int, int]], excerpts: dict[int, str]) -> None:
        """The kept documents' keys (sorted per partition), signatures, hashes and excerpts, numbered in rank
        order, and the sample of dropped documents (document -> (reason, link)); built in the scratch folder,
        then renamed into place."""
        tmp = self.work / "index"
        (tmp / "keys").mkdir()
        for path in self.keys:
            rec = _read(path, _RECORD)
            rec = rec[self.keep[rec["doc"]]]
            rec["doc"] = index_of[rec["doc"]]
            rec[np.lexsort((rec["doc"], rec["key"]))].tofile(tmp / "keys" / path.name)
        chash: dict[int, int] = {}
        want = np.array(sorted(set(sample) | {k for _, k in sample.values()}), dtype=np.int64)
        src = _SigFile(self.work / "sigs.u32", self.cfg.num_hashes)
        try:
            with open(tmp / "sigs.u32", "wb") as sigs, open(tmp / "chash.u64", "wb") as hashes:
                for path in self.docs:  # in rank order, so in the index's numbering
                    rec = _read(path, _DOC)
                    hit = np.isin(rec["doc"], want)
                    chash.update(zip(rec["doc"][hit].tolist(), rec["chash"][hit].tolist(), strict=True))
                    rec = rec[self.keep[rec["doc"]]]
                    hashes.write(rec["chash"].tobytes())
                    for s in range(0, len(rec), _SIG_CHUNK):
                        sigs.write(src.rows(rec["doc"][s : s + _SIG_CHUNK].astype(np.int64)).tobytes())
            lines = [self._sample_line(d, r, k, chash, excerpts, src) for d, (r, k) in sample.items()]
        finally:
            src.close()
        (tmp / "dropped.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        meta = {"fingerprint": self.job.fingerprint, "documents": self.stats.kept, "excerpt_bytes": EXCERPT_BYTES}
        (tmp / "meta.json").write_text(json.dumps({**meta, **asdict(self.cfg)}))
        final = self.job.index
        final.parent.mkdir(parents=True, exist_ok=True)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        self.stats.samples = str(final.relative_to(self.data_dir) / "dropped.jsonl")

    def _sample_line(
        self, d: int, r: int, k: int, chash: dict[int, int], excerpts: dict[int, str], sigs: _SigFile
    ) -> dict[str, Any]:
        """One dropped document d (dropped for reason r as a copy of k): its excerpt and hash, the kept document
        it duplicates, their estimated Jaccard."""
        line: dict[str, Any] = {"excerpt": excerpts.get(d, ""), "hash": f"{chash[d]:016x}"}
        if r in (1, 2):
            jac = 1.0 if r == 1 else float(_jaccard(sigs, sigs, np.array([[d, k]]))[0])
            line.update(reason="exact" if r == 1 else "fuzzy", jaccard=jac)
            line["kept"] = {"source": self.name, "excerpt": excerpts.get(k, ""), "hash": f"{chash[k]:016x}"}
        else:
            other, folder, _ = self.job.against[r - 3]
            theirs = _SigFile(folder / "sigs.u32", self.cfg.num_hashes)
            try:
                jac = float((sigs.rows(np.array([d])) == theirs.rows(np.array([k]))).mean())
            finally:
                theirs.close()
            meta = read_meta(folder) or {}
            width = int(meta.get("excerpt_bytes", EXCERPT_BYTES))
            with open(folder / "excerpts.bin", "rb") as f:
                f.seek(k * width)
                text = f.read(width).rstrip(b"\0").decode("utf-8", errors="ignore")
            their = np.fromfile(folder / "chash.u64", dtype=np.uint64, count=1, offset=k * 8)
            line.update(reason=f"against:{other}", jaccard=jac)
            line["kept"] = {"source": other, "excerpt": text, "hash": f"{int(their[0]):016x}"}
        return line


def _ranges(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each c in counts, concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
