"""All three curation steps on one source, as a user meets them: the quality filter, dedup and
decontamination set in YAML plus a key=value override, run through the `scalegpt` command, the printed
table's rows chaining and equal to counts made by hand from the inputs (the classifier's decisions
recomputed from its saved weights, duplicates found by exact shingle Jaccard over the planted pairs, the
planted test query found by search), and `scalegpt inspect --curation` naming, for each duplicate it
shows, the planted partner that was kept."""

from __future__ import annotations

import ast
import itertools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_curation_quality import CORPORA, _head, expected, needs_corpora, write_jsonl
from test_curation_report import table_row

from scalegpt.train.data import builtin
from scalegpt.train.data.mixture import read_manifest
from scalegpt.train.data.prepare.dedup import normalize
from scalegpt.train.evaluation.tasks import TASKS, queries

from e2e import scalegpt
from helpers import decoded_documents

THRESHOLD = 0.6  # dedup's threshold, set by the key=value override
"""A pair is a duplicate at this estimated Jaccard; the test's pairs lie well away from it on either side."""


def near_copy(doc: str, k: int) -> str:
    """doc as another site carries it: one word in 40 changed and a boilerplate line added."""
    words = doc.split(" ")
    for i in range(k % 40, len(words), 40):
        words[i] = "changed"
    return " ".join(words) + "\nShare this page with your friends."


def shingles(doc: str, n: int = 3) -> set[tuple[str, ...]]:
    words = normalize(doc).split(" ")
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def flat(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Chain:
    config: Path
    data: Path
    docs: list[str]
    """The source's documents, in file order."""
    pairs: list[tuple[str, str]]
    """Planted fuzzy pairs: (original, near copy)."""
    exact: list[tuple[str, str]]
    """Planted exact pairs: the same words, other whitespace."""
    host: str
    """The document the test query is planted in."""
    query: str
    out: str
    """What prepare printed."""


def _pieces(count: int) -> list[str]:
    """Web prose in pieces of about 800 characters, a paragraph boundary apart."""
    web, docs, at = (CORPORA / "web_fineweb_edu_sample.txt").read_text(), [], 0
    while len(docs) < count:
        end = web.index("\n", at + 800)
        docs.append(web[at:end].strip())
        at = end
    return docs


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    if not (CORPORA / "wiki_wikitext2_valid.txt").is_file():
        pytest.skip(f"the shared corpora are absent ({CORPORA})")
    root = tmp_path_factory.mktemp("chain")
    (root / "books.txt").write_text(_head(CORPORA / "books_moby_dick.txt", 150_000))
    (root / "wiki.txt").write_text(_head(CORPORA / "wiki_wikitext2_valid.txt", 150_000))
    web = _pieces(80)
    query = queries(TASKS["2D+"], 1000, 1234)[0].line  # a test query of `scalegpt eval`'s default seed
    host = f"{web[0]}\n{web[1]} {query} {web[2]}\n{web[3]}"  # a long page: a piece on each side survives
    pairs = [(d, near_copy(d, k)) for k, d in enumerate(web[4:10])]
    exact = [(d, d.replace(" ", "\n", 3)) for d in web[10:12]]
    docs = [host, *web[12:], *[d for pair in pairs + exact for d in pair]]
    docs += builtin.generate("junk", 0.05, seed=11)
    docs = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
    write_jsonl(root / "crawl.jsonl", docs)
    config = root / "chain.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            run: {{dir: {root / "run"}, seed: 3}}
            model: {{n_layer: 1, n_head: 2, d_model: 32, n_ctx: 64, vocab_size: 300}}
            train: {{global_batch: 8, micro_batch: 8}}
            data:
              dir: {root / "data"}
              tokenizer: bpe
              tokenizer_sample_mb: 0.1
              val_fraction: 0.02
              reference_sources:
                - {{name: junk, builtin: junk, builtin_mb: 0.3}}
              sources:
                - {{name: books, path: {root / "books.txt"}, weight: 0.3}}
                - {{name: wiki, path: {root / "wiki.txt"}, weight: 0.2}}
                - name: crawl
                  path: {root / "crawl.jsonl"}
                  weight: 0.5
                  curation:
                    quality: {{positives: [books, wiki], negatives: [junk], max_examples: 300, keep: threshold}}
                    dedup: {{within: true}}
                    decontaminate: {{tasks: [2D+]}}
            """
        )
    )
    out = scalegpt("prepare", str(config), f"data.sources.2.curation.dedup.threshold={THRESHOLD}").stdout
    return Chain(config, root / "data", docs, pairs, exact, host, query, out)


@dataclass
class ByHand:
    quality_kept: list[str]
    dropped_exact: int
    dropped_fuzzy: int


def by_hand(c: Chain) -> ByHand:
    """The quality filter's decisions from the saved classifier; exact duplicates by their words and fuzzy
    ones by exact 3-word-shingle Jaccard, among the documents the filter kept."""
    manifest = read_manifest(c.data)
    assert manifest is not None
    entry = next(e for e in manifest["sources"] if e["name"] == "crawl")
    kept, _ = expected(c.data, c.docs, entry["curation"]["quality"]["rule"])
    q = [d for d, k in zip(c.docs, kept, strict=True) if k]
    unique = list(dict.fromkeys(normalize(d) for d in q))
    parent = list(range(len(unique)))  # fuzzy clusters among the distinct texts; each keeps one document

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(unique)), 2):
        sim = jaccard(unique[i], unique[j])
        assert not 0.35 <= sim <= 0.75, (sim, unique[i][:80], unique[j][:80])  # no pair near the threshold
        if sim >= THRESHOLD:
            parent[root(j)] = root(i)
    clusters = len({root(i) for i in range(len(unique))})
    return ByHand(q, len(q) - len(unique), len(unique) - clusters)


def cells(docs: int, mb: float, kept: int, mb_kept: float, dropped: int) -> list[str]:
    return [f"{docs:,}", f"{mb:.2f}", f"{kept:,}", f"{mb_kept:.2f}", f"{dropped:,}", f"{100 * dropped / docs:.1f}%"]


def mb(docs: list[str]) -> float:
    return sum(len(d.encode()) for d in docs) / 1e6


@needs_corpora
def test_three_steps_chain_in_the_printed_table_and_equal_counts_by_hand(chain: Chain) -> None:
    hand = by_hand(chain)
    q = hand.quality_kept
    both = {
        kind: sum(a in q and b in q for a, b in pairs)
        for kind, pairs in (("fuzzy", chain.pairs), ("exact", chain.exact))
    }
    assert chain.host in q and both["fuzzy"] >= 2 and both["exact"] >= 1  # each step has work to do
    assert (hand.dropped_exact, hand.dropped_fuzzy) == (both["exact"], both["fuzzy"])  # the planted ones only
    n_dedup = len(q) - hand.dropped_exact - hand.dropped_fuzzy

    tokens = decoded_documents(chain.data, "crawl")  # what decontamination wrote
    pieces = [t for t in tokens if t not in q]  # the host's two pieces, cut around the query
    assert len(pieces) == 2 and all(p in chain.host for p in pieces) and chain.query not in "".join(tokens)
    dedup_kept = [t for t in tokens if t in q] + [chain.host]
    assert len(tokens) == n_dedup + 1 and len(dedup_kept) == n_dedup

    quality_row = table_row(chain.out, "crawl", "quality")
    dedup_row = table_row(chain.out, "crawl", "dedup")
    decon_row = table_row(chain.out, "crawl", "decontaminate")
    assert quality_row == cells(len(chain.docs), mb(chain.docs), len(q), mb(q), len(chain.docs) - len(q))
    assert dedup_row == cells(len(q), mb(q), n_dedup, mb(dedup_kept), len(q) - n_dedup)
    assert decon_row == cells(n_dedup, mb(dedup_kept), n_dedup + 1, mb(tokens), 0)  # nothing dropped whole
    assert dedup_row[:2] == quality_row[2:4] and decon_row[:2] == dedup_row[2:4]  # the rows chain

    manifest = read_manifest(chain.data)
    assert manifest is not None
    entry = next(e for e in manifest["sources"] if e["name"] == "crawl")
    assert entry["settings"]["curation"]["dedup"]["threshold"] == THRESHOLD  # the key=value override
    d = entry["curation"]["dedup"]
    assert (d["dropped_exact"], d["dropped_fuzzy"], d["dropped_against"]) == (both["exact"], both["fuzzy"], {})
    assert d["bytes_kept"] == sum(len(x.encode()) for x in dedup_kept)
    c = entry["curation"]["decontaminate"]
    assert (c["matches"], c["touched"], c["dropped"], c["pieces"]) == (1, 1, 0, n_dedup + 1)


@needs_corpora
def test_inspect_shows_each_duplicate_with_the_planted_copy_that_was_kept(chain: Chain) -> None:
    out = scalegpt("inspect", str(chain.config), "--curation", "--show", "3").stdout
    assert "crawl, dedup: 3 of the documents it dropped" in out
    section = out.split("crawl, dedup: 3 of the documents it dropped")[1].split("\ncrawl, ")[0]
    shown = re.findall(
        r"- (exact|fuzzy) copy, estimated Jaccard ([0-9.]+) of document ([0-9a-f]{16}) kept in crawl: (.*)\n    (.*)",
        section,
    )
    assert len(shown) == 3, section
    planted = {**{p: "fuzzy" for p in chain.pairs}, **{p: "exact" for p in chain.exact}}
    hashes = {}
    for reason, jac, kept_hash, kept_excerpt, dropped_excerpt in shown:
        kept_text, dropped_text = ast.literal_eval(kept_excerpt), ast.literal_eval(dropped_excerpt)
        (pair,) = {  # an exact pair reads the same either way round
            p
            for p in planted
            for a, b in (p, p[::-1])
            if flat(a).startswith(dropped_text.removesuffix("..."))
            and flat(b).startswith(kept_text.removesuffix("..."))
        }
        assert reason == planted[pair]
        assert float(jac) == pytest.approx(jaccard(*pair), abs=0.15)  # MinHash's estimate of the true value
        assert hashes.setdefault(kept_text, kept_hash) == kept_hash
