"""The quality filter as a prepare step (GPT-3 Appendix A): a linear classifier on hashed word features,
trained on sources the config names as positives against negatives (sources of the mixture, or
data.reference_sources, which are read here and never tokenized), scores each document of the filtered
source, and a document is kept when `pareto(alpha) > 1 - score` (or, as the alternative, score >= threshold).

The pieces, and why each is so:
- Features are scikit-learn's HashingVectorizer (lowercased words split on whitespace, as Spark's tokenizer
  the paper used, n-grams 1..ngrams, murmurhash3 into `buckets`, l2-normalized) and the model is its
  LogisticRegression: the paper's model, fitted to its optimum, so a retrain on the same sample gives the
  same weights. Scoring is ours (features times weights, then the logistic), so a classifier trained now and
  one loaded from disk score a document alike, bit for bit.
- Training reads each positive and negative source once, cut into examples of about EXAMPLE_CHARS
  characters (a book is one document here), and keeps the max_examples of each class with the lowest hashes:
  a bounded sample that no order of documents changes. One example in HELDOUT, by another part of the hash,
  is held out for the AUC and accuracy prepare prints.
- The Pareto draw of a document comes from a hash of its text (numpy's pareto is the Lomax distribution,
  whose inverse CDF turns a uniform draw u into (1 - u)^(-1/alpha) - 1), so the same document gets the
  same decision whatever the order of documents, the number of workers or a resume. A document of score s
  is kept with probability (2 - s)^-alpha.
- The trained classifier is saved beside the data (data.dir/curation/quality-<source>.npz with its weights
  and .json with its features, training sample and held-out metrics; no pickle), reused by the next prepare
  whose training inputs match, and its fingerprint is part of the filtered source's settings: a retrain that
  comes out identical re-prepares nothing, a changed positive source re-prepares the filtered one.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config.schema import DataConfig
from ...errors import UserError
from ...osutil import atomic_path, write_json_atomic
from .. import sources as src_mod
from ..curation import CURATION_DIR, QualityConfig
from .staged import Staged

VERSION = 1
"""Part of a filtered source's settings and of a classifier's training key: bump when either changes."""
FORMAT = "scalegpt-quality-classifier"
"""data.dir's folder for what curation saves beside the token files."""
EXAMPLE_CHARS = 2000
"""Training examples are pieces of about this many characters, cut at whitespace: a source may hold one long
document (a book), and the sample needs many."""
HELDOUT = 10
"""One training example in this many, by hash, is held out for the metrics."""
TOKEN_PATTERN = r"(?u)\S+"
"""Words are what whitespace separates, as Spark's standard tokenizer (the paper's) splits them."""
REGULARIZATION = 1.0
"""LogisticRegression's C (its default)."""
BINS = 20
"""Score histogram bins over [0, 1], for the report and the figure."""
DROPPED_SAMPLE = 100
"""Dropped documents kept in the report for `scalegpt inspect` (the first ones, in the source's order)."""
DROPPED_CHARS = 400
"""Characters kept of each dropped document in the report."""


# --- settings ---------------------------------------------------------------------------------------


def active(cfg: QualityConfig) -> bool:
    return bool(cfg.positives or cfg.classifier)


def check(cfg: QualityConfig, key: str, data: DataConfig, own: str) -> None:
    """Raise UserError naming the setting when cfg is wrong (before prepare reads or writes anything)."""
    if not active(cfg):
        return
    names = {s.name for s in [*data.sources, *data.reference_sources]}
    if cfg.keep not in ("pareto", "threshold"):
        raise UserError(f"{key}.keep must be 'pareto' or 'threshold', got {cfg.keep!r}")
    if not (cfg.alpha > 0 and math.isfinite(cfg.alpha)):
        raise UserError(f"{key}.alpha must be a number greater than 0 (the paper's is 9), got {cfg.alpha}")
    if not 0 <= cfg.threshold <= 1:
        raise UserError(f"{key}.threshold must be in [0, 1] (a classifier score), got {cfg.threshold}")
    for what in ("positives", "negatives"):
        for name in getattr(cfg, what):
            if name not in names:
                raise UserError(
                    f"{key}.{what}: no source named {name!r} in data.sources or data.reference_sources "
                    f"({available(data)}); name one of them, or add it to data.reference_sources"
                )
    if cfg.classifier:
        return  # the training settings are not used
    if own in cfg.positives:
        raise UserError(f"{key}.positives: the filtered source {own!r} cannot be its own positive")
    both = sorted(set(cfg.positives) & set(cfg.negatives or [own]))
    if both:
        raise UserError(f"{key}: {', '.join(both)} cannot be both positive and negative")
    for name, value, low in (
        ("buckets", cfg.buckets, 2),
        ("ngrams", cfg.ngrams, 1),
        ("max_examples", cfg.max_examples, 2),
    ):
        if value < low:
            raise UserError(f"{key}.{name} must be at least {low}, got {value}")


def available(data: DataConfig) -> str:
    """The names a quality step may name, for an error line."""
    refs = ", ".join(s.name for s in data.reference_sources) or "none"
    return f"sources: {', '.join(s.name for s in data.sources)}; reference sources: {refs}"


def trained_on(data: DataConfig) -> set[str]:
    """The names of the sources that some quality step trains its classifier on (a saved classifier reads none)."""
    return {
        name
        for s in data.sources
        if active(q := s.curation.quality) and not q.classifier
        for name in (*q.positives, *q.negatives)
    }


@dataclass(frozen=True)
class KeepRule:
    """Which documents of a given score are kept."""

    keep: str
    alpha: float
    threshold: float

    @classmethod
    def of(cls, cfg: QualityConfig) -> KeepRule:
        return cls(cfg.keep, cfg.alpha, cfg.threshold)

    def row(self) -> dict[str, Any]:
        """The settings that decide, and only those (changing an unused one re-prepares nothing)."""
        if self.keep == "pareto":
            return {"keep": "pareto", "alpha": self.alpha}
        return {"keep": "threshold", "threshold": self.threshold}

    def decide(self, scores: np.ndarray, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(kept mask, the Pareto draws or None) for documents of these scores."""
        if self.keep == "threshold":
            return scores >= self.threshold, None
        draws = pareto_draws(docs, self.alpha)
        return pareto_keep(scores, draws), draws

    def probability(self, scores: np.ndarray) -> np.ndarray:
        """The chance that a document of each score is kept: (2 - s)^-alpha, or the threshold's step."""
        if self.keep == "threshold":
            return (scores >= self.threshold).astype(np.float64)
        return (2.0 - scores) ** -self.alpha


def _digest(text: str, person: bytes) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=person).digest()


def pareto_draws(docs: Sequence[str], alpha: float) -> np.ndarray:
    """Each document's draw from numpy's pareto(alpha) (the Lomax distribution), seeded by its text alone:
    a uniform u in [0, 1) from 53 bits of a hash, through the inverse CDF (1 - u)^(-1/alpha) - 1."""
    bits = np.fromiter(
        (int.from_bytes(_digest(d, b"quality-draw")[:8], "little") >> 11 for d in docs), np.float64, len(docs)
    )
    u = bits * 2.0**-53
    return np.expm1(-np.log1p(-u) / alpha)


def pareto_keep(scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The paper's rule: keep when pareto(alpha) > 1 - score."""
    return draws > 1.0 - scores


# --- the classifier ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """The hashed word features: everything a saved classifier needs to featurize text as it was trained."""

    buckets: int
    ngrams: int

    def row(self) -> dict[str, Any]:
        return {
            "hasher": "sklearn.feature_extraction.text.HashingVectorizer",
            "n_features": self.buckets,
            "ngram_range": [1, self.ngrams],
            "lowercase": True,
            "token_pattern": TOKEN_PATTERN,
            "norm": "l2",
            "alternate_sign": False,
        }

    def vectorizer(self) -> Any:
        # imported here: scikit-learn takes about a second to import, and only a quality step needs it
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(
            n_features=self.buckets,
            ngram_range=(1, self.ngrams),
            lowercase=True,
            token_pattern=TOKEN_PATTERN,
            norm="l2",
            alternate_sign=False,
            dtype=np.float64,
        )


@dataclass
class Classifier:
    """Logistic regression weights over hashed features, with what it was trained on and how well it did."""

    features: Features
    coef: np.ndarray
    """float64, one weight per bucket."""
    intercept: float
    metrics: dict[str, Any]
    training: dict[str, Any]
    """The training key and sample (sources, sizes), for the saved JSON and the cache."""
    loaded_from: Path | None = None
    """The JSON it was read from; None when this run trained it (then prepare saves it)."""
    _vectorizer: Any = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """What decides its scores: the features and the weights, bit for bit."""
        h = hashlib.sha256(json.dumps(self.features.row(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.coef, dtype="<f8").tobytes())
        h.update(np.float64(self.intercept).astype("<f8").tobytes())
        return h.hexdigest()

    def scores(self, docs: Sequence[str]) -> np.ndarray:
        """P(positive) of each document: the logistic of features . weights + intercept."""
        if self._vectorizer is None:
            self._vectorizer = self.features.vectorizer()
        z = self._vectorizer.transform(docs) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, stem: Path) -> None:
        """stem.npz (the weights) then stem.json (features, training, metrics, fingerprint), each atomically."""
        weights = stem.with_name(stem.name + ".npz")
        with atomic_path(weights) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, coef=self.coef, intercept=np.array([self.intercept]))
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "weights": weights.name,
            "fingerprint": self.fingerprint,
            "features": self.features.row(),
            "training": self.training,
            "metrics": self.metrics,
        }
        write_json_atomic(json_path(stem), doc)

    @classmethod
    def load(cls, path: Path) -> Classifier:
        """The classifier saved at path (its .json, or the .npz beside it); ValueError says why it does not load."""
        path = json_path(path)
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(exc.strerror or str(exc)) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f'not a saved quality classifier (no "format": "{FORMAT}")')
        if doc.get("version") != VERSION:
            raise ValueError(f"saved by format version {doc.get('version')}, this scalegpt reads {VERSION}")
        try:
            feats = doc["features"]
            features = Features(int(feats["n_features"]), int(feats["ngram_range"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"its features are malformed ({exc!r})") from None
        if features.row() != feats:
            raise ValueError("its features are not the ones this scalegpt computes")
        try:
            with np.load(path.with_name(str(doc["weights"])), allow_pickle=False) as z:
                coef, intercept = np.asarray(z["coef"], np.float64), np.asarray(z["intercept"], np.float64)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"its weights {doc['weights']} do not load ({exc})") from None
        if coef.shape != (features.buckets,) or intercept.shape != (1,):
            raise ValueError(f"its weights have shape {coef.shape}, not ({features.buckets},)")
        metrics, training = doc.get("metrics", {}), doc.get("training", {})
        if not isinstance(metrics, dict) or not isinstance(training, dict):
            raise ValueError("its metrics or training record is malformed")
        clf = cls(features, coef, float(intercept[0]), metrics, training, path)
        if clf.fingerprint != doc.get("fingerprint"):
            raise ValueError("its weights do not match its fingerprint (changed or damaged since it was saved)")
        return clf


def load_configured(path: str, key: str) -> Classifier:
    """The classifier a source's `classifier:` names, or the one-line error that says what to do."""
    try:
        return Classifier.load(Path(path).expanduser())
    except ValueError as exc:
        raise UserError(
            f"{key}.classifier: {path} does not load: {exc}; point it at the quality-<source>.json that an "
            f"earlier prepare saved in its data.dir/{CURATION_DIR}/, or remove the setting to train one"
        ) from None


# --- training ---------------------------------------------------------------------------------------


@dataclass(order=True)
class Example:
    key: int
    """Orders the sample: the lowest keys of a class are taken."""
    split: int
    """held out when split % HELDOUT == 0."""
    text: str = field(compare=False)


def cut_examples(frags: Iterator[src_mod.Fragment], size: int = EXAMPLE_CHARS) -> Iterator[str]:
    """The documents as pieces of about `size` characters (whole documents when shorter), cut at whitespace."""
    buf = ""
    for text, end in frags:
        buf += text
        while len(buf) >= 2 * size:
            cut = next((i for i in range(size, len(buf)) if buf[i].isspace()), len(buf))
            if piece := buf[:cut].strip():
                yield piece
            buf = buf[cut:]
        if end:
            if piece := buf.strip():
                yield piece
            buf = ""


def example_of(text: str) -> Example:
    d = _digest(text, b"quality-sample")
    return Example(int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"), text)


def sample(sources: Sequence[src_mod.Source], data: DataConfig, max_examples: int) -> list[Example]:
    """The max_examples examples of these sources with the lowest keys, in key order: one pass, bounded memory."""
    heap: list[tuple[int, int, str]] = []  # (-key, -split, text): the largest key on top, to be replaced
    for source in sources:
        frags = src_mod.fragments(
            source, invalid_utf8=data.invalid_utf8, chunk=EXAMPLE_CHARS, stats=src_mod.ReadStats()
        )
        for text in cut_examples(frags):
            ex = example_of(text)
            item = (-ex.key, -ex.split, text)
            if len(heap) < max_examples:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return sorted(Example(-k, -s, t) for k, s, t in heap)


def training_key(
    cfg: QualityConfig, positives: Sequence[src_mod.Source], negatives: Sequence[src_mod.Source], data: DataConfig
) -> str:
    """What decides the training sample and the model: a saved classifier with this key is reused."""

    def inputs(s: src_mod.Source) -> dict[str, Any]:
        c = s.cfg
        out = {
            "name": s.name,
            "fingerprint": s.fingerprint,
            "max_documents": c.max_documents,
            "max_mb": c.max_mb,
            "text_field": c.text_field,
        }
        if c.text_documents != "file":  # only when set, so the classifiers saved before stay valid
            out["text_documents"] = c.text_documents
        return out

    key = {
        "version": VERSION,
        "positives": [inputs(s) for s in positives],
        "negatives": [inputs(s) for s in negatives],
        "invalid_utf8": data.invalid_utf8,
        "features": Features(cfg.buckets, cfg.ngrams).row(),
        "max_examples": cfg.max_examples,
        "example_chars": EXAMPLE_CHARS,
        "heldout": HELDOUT,
        "model": {"kind": "LogisticRegression", "solver": "lbfgs", "C": REGULARIZATION, "class_weight": "balanced"},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's roc_auc_score)."""
    from sklearn.metrics import roc_auc_score  # imported here: see Features.vectorizer

    return float(roc_auc_score(labels, scores))


def train(
    features: Features, positives: list[Example], negatives: list[Example], training: dict[str, Any]
) -> Classifier:
    """Fit the logistic regression on the examples not held out; measure it on those held out."""
    from sklearn.linear_model import LogisticRegression  # imported here: see Features.vectorizer

    examples = sorted([(e, 1) for e in positives] + [(e, 0) for e in negatives], key=lambda p: (p[0].key, p[1]))
    held = np.array([e.split % HELDOUT == 0 for e, _ in examples], dtype=bool)
    labels = np.array([y for _, y in examples], dtype=np.int64)
    for name, y in (("positive", 1), ("negative", 0)):
        if not np.any((labels == y) & ~held):
            raise UserError(
                f"the {name} sources give no training example ({training.get('sources', {}).get(name + 's')}); "
                f"give the classifier text of both kinds"
            )
    t0 = time.perf_counter()
    x = features.vectorizer().transform([e.text for e, _ in examples])
    model = LogisticRegression(C=REGULARIZATION, class_weight="balanced", solver="lbfgs", max_iter=1000)
    model.fit(x[~held], labels[~held])
    clf = Classifier(features, model.coef_[0].astype(np.float64), float(model.intercept_[0]), {}, training)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "train_positives": int(np.sum((labels == 1) & ~held)),
        "train_negatives": int(np.sum((labels == 0) & ~held)),
        "heldout_positives": int(np.sum((labels == 1) & held)),
        "heldout_negatives": int(np.sum((labels == 0) & held)),
        "iterations": int(model.n_iter_[0]),
        "seconds": round(seconds, 3),
        "auc": None,
        "accuracy": None,
    }
    if metrics["heldout_positives"] and metrics["heldout_negatives"]:
        s = clf.scores([e.text for (e, _), h in zip(examples, held, strict=True) if h])
        metrics["auc"] = auc(labels[held], s)
        metrics["accuracy"] = float(np.mean((s >= 0.5) == (labels[held] == 1)))
    clf.metrics = metrics
    return clf


def classifier_for(
    cfg: QualityConfig, key: str, own: src_mod.Source, by_name: dict[str, src_mod.Source], data: DataConfig, stem: Path
) -> Classifier:
    """The configured classifier, the one saved at stem when its training key matches, or a new one trained."""
    if cfg.classifier:
        return load_configured(cfg.classifier, key)
    positives = [by_name[n] for n in cfg.positives]
    negatives = [by_name[n] for n in cfg.negatives] if cfg.negatives else [own]
    features = Features(cfg.buckets, cfg.ngrams)
    k = training_key(cfg, positives, negatives, data)
    try:
        saved = Classifier.load(stem)
        if saved.training.get("key") == k:
            return saved
    except ValueError:
        pass  # absent or damaged: train a new one, which replaces it
    training = {
        "key": k,
        "sources": {"positives": [s.name for s in positives], "negatives": [s.name for s in negatives]},
        "max_examples": cfg.max_examples,
        "example_chars": EXAMPLE_CHARS,
    }
    return train(
        features, sample(positives, data, cfg.max_examples), sample(negatives, data, cfg.max_examples), training
    )


def describe(name: str, clf: Classifier) -> str:
    """One line for the prepare log: where the classifier comes from and its held-out metrics."""
    m = clf.metrics
    if m.get("auc") is None:
        quality_ = "no held-out metrics (a class has no held-out example)"
    else:
        quality_ = (
            f"held-out AUC {m['auc']:.4f}, accuracy {m['accuracy']:.4f} "
            f"on {m['heldout_positives']:,} positive and {m['heldout_negatives']:,} negative examples"
        )
    if clf.loaded_from is not None:
        return f"  {name}: quality classifier {clf.fingerprint[:12]} from {clf.loaded_from}: {quality_}"
    s = clf.training["sources"]
    return (
        f"  {name}: trained a quality classifier {clf.fingerprint[:12]} on {m['train_positives']:,} examples of "
        f"{', '.join(s['positives'])} against {m['train_negatives']:,} of {', '.join(s['negatives'])} "
        f"in {m['seconds']:.1f}s: {quality_}"
    )


def settings(cfg: QualityConfig, clf: Classifier | None) -> dict[str, Any] | None:
    """What goes into the filtered source's settings (so a change re-prepares it), or None when the step is off."""
    if clf is None:
        return None
    return {"classifier": clf.fingerprint, **KeepRule.of(cfg).row(), "version": VERSION}


def json_path(path: Path) -> Path:
    """A saved classifier's JSON, from its own path, its .npz's or the stem they share."""
    if path.suffix == ".npz":
        return path.with_suffix(".json")
    return path if path.suffix == ".json" else path.with_name(path.name + ".json")


def stem(data_dir: Path, file: str) -> Path:
    """Where the curation of the source whose token file is `file` saves its classifier and figure (no suffix)."""
    return data_dir / CURATION_DIR / f"quality-{Path(file).stem}"


# --- the step ---------------------------------------------------------------------------------------


@dataclass
class QualityStats:
    """What the filter did to one source, for the prepare log, the manifest and `scalegpt inspect`."""

    rule: dict[str, Any]
    classifier: str
    figure: str
    """The score figure's path, relative to data.dir."""
    documents: int = 0
    bytes: int = 0
    kept: int = 0
    bytes_kept: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)
    """Documents by score, in BINS equal bins over [0, 1]."""
    kept_histogram: list[int] = field(default_factory=lambda: [0] * BINS)
    dropped_sample: list[dict[str, Any]] = field(default_factory=list)
    """The first DROPPED_SAMPLE dropped documents: score, draw (keep=pareto), bytes and the start of the text."""

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "dropped": self.documents - self.kept}

    def summary(self) -> str:
        share = self.kept / max(1, self.documents)
        return (
            f"kept {self.kept:,} of {self.documents:,} documents ({share:.1%}), {self.bytes / 1e6:.2f} -> "
            f"{self.bytes_kept / 1e6:.2f} MB ({', '.join(f'{k} {v}' for k, v in self.rule.items())})"
        )


@dataclass
class QualityFilter:
    """A classifier and a keep rule applied to a source's documents, a batch at a time."""

    clf: Classifier
    rule: KeepRule
    stats: QualityStats
    staged: Staged | None = None
    """Scores computed ahead by `scalegpt curate` (staged.py), looked up instead of computed."""

    @classmethod
    def of(cls, cfg: QualityConfig, clf: Classifier, figure: str) -> QualityFilter:
        rule = KeepRule.of(cfg)
        return cls(clf, rule, QualityStats(rule.row(), clf.fingerprint, figure))

    def fresh(self) -> QualityFilter:
        """The same filter with its counts at zero (a source read again counts again)."""
        return QualityFilter(
            self.clf, self.rule, QualityStats(self.stats.rule, self.stats.classifier, self.stats.figure), self.staged
        )

    def decide(self, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(kept mask, scores) of the documents; counted into stats."""
        scores = self.staged.get("scores", docs) if self.staged is not None else self.clf.scores(docs)
        kept, draws = self.rule.decide(scores, docs)
        st = self.stats
        sizes = [len(d.encode("utf-8", "surrogatepass")) for d in docs]
        st.documents += len(docs)
        st.bytes += sum(sizes)
        st.kept += int(kept.sum())
        st.bytes_kept += sum(n for n, k in zip(sizes, kept.tolist(), strict=True) if k)
        for hist, mask in ((st.histogram, None), (st.kept_histogram, kept)):
            counts, _ = np.histogram(scores if mask is None else scores[mask], bins=BINS, range=(0.0, 1.0))
            hist[:] = [a + int(b) for a, b in zip(hist, counts, strict=True)]
        for i in np.flatnonzero(~kept).tolist():
            if len(st.dropped_sample) >= DROPPED_SAMPLE:
                break
            st.dropped_sample.append(
                {
                    "score": float(scores[i]),
                    "draw": None if draws is None else float(draws[i]),
                    "bytes": sizes[i],
                    "text": docs[i][:DROPPED_CHARS],
                }
            )
        return kept, scores

    def apply(self, frags: Iterator[src_mod.Fragment]) -> Iterator[src_mod.Fragment]:
        """The source's kept documents, each whole (joined from its fragments), scored about a megabyte at a time."""
        for batch in src_mod.document_batches(frags):
            yield from self._emit(batch)

    def _emit(self, batch: list[str]) -> Iterator[src_mod.Fragment]:
        if batch:
            kept, _ = self.decide(batch)
            for doc, k in zip(batch, kept.tolist(), strict=True):
                if k:
                    yield doc, True


# --- the figure -------------------------------------------------------------------------------------


def draw(row: dict[str, Any], title: str, out: Path) -> None:
    """The score distribution (all documents and those kept) with the keep probability drawn over it."""
    # imported here: matplotlib takes a while to import, and only a prepare with a quality step draws
    from matplotlib.figure import Figure

    edges = np.linspace(0.0, 1.0, BINS + 1)
    width = edges[1] - edges[0]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1], row["histogram"], width=width, align="edge", color="0.8", edgecolor="0.5", label="all documents")
    ax.bar(edges[:-1], row["kept_histogram"], width=width, align="edge", color="tab:blue", alpha=0.8, label="kept")
    ax.set_xlim(0, 1)
    ax.set_xlabel("classifier score (P(positive))")
    ax.set_ylabel("documents")
    rule = KeepRule(row["rule"]["keep"], row["rule"].get("alpha", 0.0), row["rule"].get("threshold", 0.0))
    s = np.linspace(0.0, 1.0, 401)
    p = ax.twinx()
    label = (
        f"keep probability (2 - s)^-{rule.alpha:g}" if rule.keep == "pareto" else f"keep: score >= {rule.threshold:g}"
    )
    p.plot(s, rule.probability(s), color="tab:red", lw=2, label=label)
    p.set_ylim(0, 1.02)
    p.set_ylabel("keep probability")
    handles = ax.get_legend_handles_labels()[0] + p.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    ax.set_title(
        f"{title}: kept {row['kept']:,} of {row['documents']:,} documents (classifier {row['classifier'][:12]})"
    )
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_outputs(
    data_dir: Path,
    trained: dict[str, tuple[Classifier, Path]],
    manifest: dict[str, Any],
    old: dict[str, Any] | None,
    echo: Any,
) -> None:
    """After the manifest is written: each classifier trained in this run saved, and the figure of each source
    whose quality row is new or whose figure is missing drawn."""
    for name, (clf, where) in trained.items():
        if clf.loaded_from is None:
            clf.save(where)
            clf.loaded_from = json_path(where)
            echo(f"  {name}: saved its quality classifier in {clf.loaded_from} (weights in .npz beside it)")
    before = {e["name"]: e for e in (old or {}).get("sources", [])}
    for entry in manifest["sources"]:
        row = entry.get("curation", {}).get("quality")
        if row is None:
            continue
        out = data_dir / row["figure"]
        if before.get(entry["name"]) != entry or not out.is_file():
            draw(row, entry["name"], out)
