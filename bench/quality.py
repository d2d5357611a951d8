"""The quality classifier's candidates on the same sample: documents per second to train (features + fit) and
to score (features + weights), and held-out AUC, for real prose (the shared books and Wikipedia corpora) against
builtin junk, as `curation.quality` samples them (examples of about 2,000 characters, one in ten held out).

    .venv/bin/python bench/quality.py [--corpora ../shared/data/corpora] [--junk-mb 4] [--max-examples 10000]
        [--repeats 3]

Candidates:
- sklearn-lr: scikit-learn's HashingVectorizer and LogisticRegression (lbfgs), what prepare uses;
- sklearn-sgd: the same features, logistic loss fitted by SGDClassifier;
- by hand: words hashed with zlib.crc32 in Python into the same buckets, and a logistic regression fitted by
  full-batch gradient descent (numpy on a scipy sparse matrix): what we would write without scikit-learn.
Scoring is timed on the held-out examples plus the web corpus cut into pieces (text none of them trained on).
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scalegpt.train.config.schema import DataConfig, SourceConfig
from scalegpt.train.data import sources as src_mod
from scalegpt.train.data.prepare import quality

BUCKETS = 1 << 18


def by_hand_features(docs: Sequence[str]) -> sp.csr_matrix:
    """Unigrams and bigrams of lowercased whitespace words, crc32 into BUCKETS, counts l2-normalized."""
    indptr, indices, data = [0], [], []
    for doc in docs:
        words = doc.lower().split()
        grams = words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]
        ids, counts = np.unique(
            np.array([zlib.crc32(g.encode()) % BUCKETS for g in grams], np.int64), return_counts=True
        )
        indices.append(ids)
        values = counts.astype(np.float64)
        data.append(values / max(np.linalg.norm(values), 1e-12))
        indptr.append(indptr[-1] + len(ids))
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=(len(docs), BUCKETS))


def by_hand_fit(x: sp.csr_matrix, y: np.ndarray, steps: int = 200, lr: float = 2.0, l2: float = 1e-4) -> np.ndarray:
    """Balanced logistic regression by full-batch gradient descent; returns the weights with the bias last."""
    w, b = np.zeros(x.shape[1]), 0.0
    weight = np.where(y == 1, 0.5 / max(1, y.sum()), 0.5 / max(1, (1 - y).sum()))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g = weight * (p - y)
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum()
    return np.append(w, b)


def sklearn_candidate(kind: str) -> tuple[Callable, Callable]:
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    vec = quality.Features(BUCKETS, 2).vectorizer()

    def fit(docs: list[str], y: np.ndarray) -> np.ndarray:
        model = (
            LogisticRegression(C=quality.REGULARIZATION, class_weight="balanced", max_iter=1000)
            if kind == "lr"
            else SGDClassifier(loss="log_loss", class_weight="balanced", random_state=0)
        )
        model.fit(vec.transform(docs), y)
        return np.append(model.coef_[0], model.intercept_[0])

    def score(w: np.ndarray, docs: list[str]) -> np.ndarray:
        return 1 / (1 + np.exp(-(vec.transform(docs) @ w[:-1] + w[-1])))

    return fit, score


def by_hand_candidate() -> tuple[Callable, Callable]:
    def fit(docs: list[str], y: np.ndarray) -> np.ndarray:
        return by_hand_fit(by_hand_features(docs), y)

    def score(w: np.ndarray, docs: list[str]) -> np.ndarray:
        return 1 / (1 + np.exp(-(by_hand_features(docs) @ w[:-1] + w[-1])))

    return fit, score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"))
    p.add_argument("--junk-mb", type=float, default=4.0)
    p.add_argument("--max-examples", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    args = p.parse_args()
    corpora, data = Path(args.corpora), DataConfig()
    positives = [
        src_mod.resolve(SourceConfig(name="books", path=str(corpora / "books_*.txt"))),
        src_mod.resolve(SourceConfig(name="wiki", path=str(corpora / "wiki_wikitext2_valid.txt"))),
    ]
    junk = [src_mod.resolve(SourceConfig(name="junk", builtin="junk", builtin_mb=args.junk_mb))]
    web = [src_mod.resolve(SourceConfig(name="web", path=str(corpora / "web_fineweb_edu_sample.txt")))]
    t0 = time.perf_counter()
    pos, neg = quality.sample(positives, data, args.max_examples), quality.sample(junk, data, args.max_examples)
    sampled = time.perf_counter() - t0
    web_docs = [e.text for e in quality.sample(web, data, args.max_examples)]
    examples = [(e, 1) for e in pos] + [(e, 0) for e in neg]
    held = np.array([e.split % quality.HELDOUT == 0 for e, _ in examples])
    texts = [e.text for e, _ in examples]
    y = np.array([label for _, label in examples])
    train_docs = [t for t, h in zip(texts, held, strict=True) if not h]
    test_docs = [t for t, h in zip(texts, held, strict=True) if h]
    score_docs = test_docs + web_docs
    mb_train = sum(map(len, train_docs)) / 1e6
    print(
        f"sample: {len(pos):,} positive and {len(neg):,} negative examples ({sum(map(len, texts)) / 1e6:.1f} MB) "
        f"read and hashed in {sampled:.1f}s; train {len(train_docs):,} ({mb_train:.1f} MB), "
        f"held out {len(test_docs):,}, scored {len(score_docs):,} (held out + {len(web_docs):,} web pieces)"
    )
    print("| candidate | train docs/s | train s | score docs/s | score MB/s | held-out AUC | web mean score |")
    print("|---|---|---|---|---|---|---|")
    for name, (fit, score) in (
        ("sklearn-lr (HashingVectorizer + LogisticRegression lbfgs; ours)", sklearn_candidate("lr")),
        ("sklearn-sgd (HashingVectorizer + SGDClassifier log_loss)", sklearn_candidate("sgd")),
        ("by hand (crc32 in Python + gradient descent, numpy/scipy)", by_hand_candidate()),
    ):
        t_fit, t_score = float("inf"), float("inf")
        for _ in range(args.repeats):  # the best of a few: the machine is shared, and only slower runs are noise
            t0 = time.perf_counter()
            w = fit(train_docs, y[~held])
            t_fit = min(t_fit, time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = score(w, score_docs)
            t_score = min(t_score, time.perf_counter() - t0)
        auc = quality.auc(y[held], s[: len(test_docs)])
        print(
            f"| {name} | {len(train_docs) / t_fit:,.0f} | {t_fit:.1f} | {len(score_docs) / t_score:,.0f} | "
            f"{sum(map(len, score_docs)) / 1e6 / t_score:.2f} | {auc:.4f} | {s[len(test_docs) :].mean():.3f} |"
        )
    docs = [f"document {i}" for i in range(100_000)]
    t0 = time.perf_counter()
    quality.pareto_draws(docs, 9.0)
    print(f"pareto draws (blake2b per document): {len(docs) / (time.perf_counter() - t0):,.0f} docs/s")


if __name__ == "__main__":
    main()
