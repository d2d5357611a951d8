"""What `scalegpt prepare` does to a source's text before tokenizing it: its `curation:` settings.

Declared per source in the data config, e.g.

    sources:
      - name: arithmetic
        builtin: arithmetic
        curation: {decontaminate: {tasks: [2D+, mc-2D+, reverse]}}

The settings are part of the source's manifest entry, so changing one source's curation re-prepares that
source alone, and unchanged settings do nothing. The step itself is train/data/prepare/decontaminate.py;
this module holds only the schema, so that loading a config stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CURATION_DIR = "curation"
"""data.dir/curation/ holds what the steps keep beside the token files: classifiers, figures, indexes."""


@dataclass
class DecontaminateConfig:
    """GPT-3 Appendix C: remove the training text that overlaps evaluation tasks."""

    tasks: list[str] = field(default_factory=list)
    """Built-in tasks (names or the paper's aliases, as `scalegpt eval --tasks` takes them) whose test
    queries are removed; none (the default) turns the step off. Each is matched with the N that `scalegpt
    eval --contamination` uses for it."""
    texts: list[str] = field(default_factory=list)
    """Files of other evaluation examples to remove (a benchmark exported from lm-eval, say): in a .jsonl file
    each line's "text", in any other file each non-empty line. A file is matched with the paper's N for its
    examples (the 5th percentile of their lengths in words, 8 to 13); an example shorter than N is one gram."""
    num_examples: int = 1000
    """Queries per task that make its test set: the first ones `scalegpt eval --seed SEED` draws, so an
    eval with --num-examples up to this many finds none of them in the decontaminated text."""
    seed: int = 1234
    """The eval's --seed whose queries are removed (scalegpt eval's default)."""
    window: int = 200
    """Characters removed on each side of a match (the paper's 200), widened to whole words."""
    min_piece: int = 200
    """A piece of a split document shorter than this many characters is dropped."""
    max_pieces: int = 10
    """A document split into more pieces than this is dropped whole."""


@dataclass
class QualityConfig:
    """GPT-3 Appendix A: keep a document by the score of a linear classifier on hashed word features, trained on
    sources the config names as positives against negatives (the paper: WebText, books and Wikipedia against
    raw Common Crawl)."""

    positives: list[str] = field(default_factory=list)
    """Names of sources (of data.sources or data.reference_sources) whose text is good; none (the default) turns
    the step off, unless `classifier` names a saved one."""
    negatives: list[str] = field(default_factory=list)
    """Names of sources whose text is the negative class (generated junk belongs in data.reference_sources, so
    that it is not trained on); none means the filtered source itself (the paper's raw Common Crawl)."""
    buckets: int = 1 << 18
    """Hashed feature buckets (the paper's HashingTF size is not stated)."""
    ngrams: int = 2
    """Word n-grams hashed, from 1 up to this many (lowercased words split on whitespace, as Spark's tokenizer)."""
    max_examples: int = 10000
    """Training examples per class at most: pieces of about 2,000 characters of the documents, the ones with
    the lowest hashes (a sample that does not depend on order); a tenth of them, by hash, is held out."""
    keep: str = "pareto"
    """'pareto' keeps a document when pareto(alpha) > 1 - score, the draw seeded by the document's text
    (the paper's rule); 'threshold' keeps it when score >= threshold."""
    alpha: float = 9.0
    """The Pareto shape (the paper's 9): a document of score s is kept with probability (2 - s)^-alpha."""
    threshold: float = 0.5
    """The lowest score kept, with keep=threshold."""
    classifier: str | None = None
    """A classifier an earlier prepare saved (its data.dir/curation/quality-<source>.json) to use instead of
    training one; positives and negatives are then not read."""


@dataclass
class DedupConfig:
    """GPT-3 Appendix A: remove exact and fuzzy (MinHash LSH) duplicate documents, within the source and
    against earlier-ranked sources (train/data/prepare/dedup.py; the defaults are measured in bench/dedup.py)."""

    within: bool = False
    """Remove duplicates inside this source: a cluster of copies keeps one document."""
    against: list[str] = field(default_factory=list)
    """Sources earlier in data.sources (each deduplicated itself) whose documents this source's copies are
    removed against: the copy in the higher-ranked source is kept, as the paper removed WebText from Common
    Crawl. The step is off while within is false and against is empty."""
    shingle: int = 3
    """Words per shingle (lowercased, split on whitespace)."""
    num_hashes: int = 128
    """MinHash functions per document."""
    bands: int = 32
    """LSH bands; must divide num_hashes. Documents sharing one band's hashes are candidates."""
    threshold: float = 0.5
    """A candidate pair is a duplicate when its estimated Jaccard similarity is at least this."""


@dataclass
class CurationConfig:
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Filter documents by a classifier's score (off until it names positives or a classifier)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Remove duplicate documents (off until within is true or against names a source)."""
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    """Remove evaluation overlaps (off until it names tasks)."""
