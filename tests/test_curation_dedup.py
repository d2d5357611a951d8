"""curation.dedup (train/data/prepare/dedup.py): planted near-duplicates removed, one of each kept, whatever the
order; the copy in the higher-ranked source kept; the settings as a user sets them, checked in the token files;
a change re-prepares only the sources it touches; bad settings are one line."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from scalegpt.launch.cli import main
from scalegpt.train.data.curation import DedupConfig
from scalegpt.train.data.mixture import read_manifest
from scalegpt.train.data.planted import Planted, PlantedDoc, sentences
from scalegpt.train.data.prepare.dedup import DedupJob, Deduplicator, normalize

from helpers import decoded_documents, one_error_line, write_config

CORPORA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "corpora"


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return sentences(CORPORA)


def run_step(
    docs: list[str], tmp: Path, cfg: DedupConfig | None = None, **job: object
) -> tuple[list[str], Deduplicator]:
    """The step on its own: the documents kept, in order, and the step (for its stats)."""
    cfg = cfg or DedupConfig(within=True)
    step = Deduplicator(
        DedupJob(cfg, tmp / "index", "fp", **job),  # type: ignore[arg-type]
        "src",
        tmp / "work",
        tmp,
    )
    kept = [text for text, end in step.apply(iter((d, True) for d in docs)) if end]
    return kept, step


def score(docs: list[PlantedDoc], kept: list[str]) -> tuple[float, float]:
    """(fraction of planted copies removed beyond one kept per cluster, fraction of clusters left with none)."""
    cluster_of = {d.text: d.cluster for d in docs}
    per = Counter(cluster_of[t] for t in kept)
    clusters = {d.cluster for d in docs}
    copies = sum(d.copy for d in docs)
    surplus = sum(max(c - 1, 0) for c in per.values())
    lost = sum(1 for c in clusters if per[c] == 0)
    return 1 - surplus / copies, lost / len(clusters)


def test_planted_copies_are_removed_leaving_one_of_each(pool: list[str], tmp_path: Path) -> None:
    docs = list(Planted(pool, seed=3).docs(800, copy_rate=0.4))
    assert sum(d.copy for d in docs) > 400
    kept, step = run_step([d.text for d in docs], tmp_path)
    removed, lost = score(docs, kept)
    assert removed >= 0.95 and lost <= 0.01, (removed, lost)
    s = step.stats
    assert s.documents == len(docs) and s.kept == len(kept)
    assert s.kept + s.dropped_exact + s.dropped_fuzzy == s.documents
    assert s.bytes == sum(len(d.text.encode()) for d in docs)
    assert s.bytes_kept == sum(len(t.encode()) for t in kept)
    assert not (tmp_path / "work").exists()  # the spool goes when the step ends


def test_exact_copies_differ_only_in_whitespace_and_are_counted_apart(pool: list[str], tmp_path: Path) -> None:
    docs = [d.text for d in Planted(pool, seed=4).docs(60, copy_rate=0)]
    spaced = ["  " + d.replace(" ", "\n \t", 3) + "\n" for d in docs[:10]]  # the same text once normalized
    recased = [docs[10].upper()]  # the same words too
    near = [docs[11].replace(" ", " and ", 1)]  # one word more: a fuzzy copy
    inputs = docs + spaced + recased + near
    kept, step = run_step(inputs, tmp_path)
    assert len(kept) == 60 and {normalize(t) for t in kept} == {normalize(t) for t in docs}
    assert (step.stats.dropped_exact, step.stats.dropped_fuzzy) == (11, 1)
    lines = [json.loads(x) for x in (tmp_path / "index" / "dropped.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and Counter(x["reason"] for x in lines) == {"exact": 11, "fuzzy": 1}
    for x in lines:  # each names the kept document it duplicates, by hash and excerpt
        assert x["jaccard"] >= 0.5 and x["kept"]["source"] == "src"
        assert (x["kept"]["hash"] == x["hash"]) == (x["reason"] == "exact")  # the hash of the normalized text
        kept_doc = next(t for t in kept if t.startswith(x["kept"]["excerpt"]))
        dropped = next(t for t in inputs if t.startswith(x["excerpt"]) and t not in kept)
        if x["reason"] == "exact":
            assert normalize(dropped) == normalize(kept_doc) and x["jaccard"] == 1.0
        else:
            assert {dropped, kept_doc} == {docs[11], near[0]} and x["jaccard"] < 1.0


def test_the_kept_documents_do_not_depend_on_their_order(pool: list[str], tmp_path: Path) -> None:
    docs = [d.text for d in Planted(pool, seed=5).docs(300, copy_rate=0.5)]
    docs += [docs[0] + "\n", " " + docs[1]]  # exact copies too, whose raw texts differ
    kept, _ = run_step(docs, tmp_path / "a")
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    again, _ = run_step(shuffled, tmp_path / "b")
    assert sorted(kept) == sorted(again) and len(kept) < len(docs)
    assert kept == [d for d in docs if d in set(kept)]  # in their order of arrival
    assert (tmp_path / "a/index/dropped.jsonl").read_text() == (tmp_path / "b/index/dropped.jsonl").read_text()


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def world(pool: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three sources: web holds 40 distinct documents and 20 copies (12 near, 8 exact) of books' documents
    plus copies of its own; books holds 50 distinct documents and near copies of them; wiki is not deduplicated."""
    root = tmp_path_factory.mktemp("dedup")
    gen = Planted(pool, seed=7)
    books = [gen.original() for _ in range(50)]
    books_copies = [gen.copy(books[i]) for i in range(10)]
    web = [gen.original() for _ in range(40)]
    web_copies = [gen.copy(web[i]) for i in range(6)]
    from_books = [gen.copy(books[i]) for i in range(20, 32)] + [books[i] + "\n" for i in range(32, 40)]
    wiki = [gen.original() for _ in range(20)]
    paths = {
        "books": write_jsonl(root / "books.jsonl", books + books_copies),
        "web": write_jsonl(root / "web.jsonl", web[:20] + from_books + web_copies + web[20:]),
        "wiki": write_jsonl(root / "wiki.jsonl", wiki + wiki[:3]),
    }
    data = {
        "dir": str(root / "data"),
        "tokenizer": "gpt2",
        "sources": [
            {"name": "books", "path": str(paths["books"]), "curation": {"dedup": {"within": True}}},
            {"name": "web", "path": str(paths["web"]), "curation": {"dedup": {"within": True, "against": ["books"]}}},
            {"name": "wiki", "path": str(paths["wiki"])},
        ],
    }
    config = root / "curated.yaml"
    cfg = json.loads(write_config(config, data, {"vocab_size": 50257}).read_text())
    config.write_text(yaml.safe_dump(cfg))  # the way a user writes it
    return {
        "root": root,
        "config": config,
        "data": root / "data",
        **{"books": books, "books_copies": books_copies, "web": web, "web_copies": web_copies, "wiki": wiki},
    }


def test_dedup_set_in_yaml_drops_what_a_count_by_hand_says(world: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", str(world["config"])]) == 0
    out = capsys.readouterr().out
    assert "books: deduplicated: 50 of 60 documents kept" in out
    assert "web: deduplicated: 40 of 66 documents kept" in out and "20 against books" in out
    data = world["data"]
    books, web = decoded_documents(data, "books"), decoded_documents(data, "web")
    # each cluster once: its lowest-hash member, the original or its copy
    for kept, originals, copies in (
        (books, world["books"], world["books_copies"]),
        (web, world["web"], world["web_copies"]),
    ):
        assert len(kept) == len(originals) and set(originals[len(copies) :]) <= set(kept)
        assert all((o in kept) != (c in kept) for o, c in zip(originals, copies, strict=False))
    assert decoded_documents(data, "wiki") == world["wiki"] + world["wiki"][:3]  # not deduplicated
    entries = {e["name"]: e for e in read_manifest(data)["sources"]}  # type: ignore[index]
    stats = entries["web"]["curation"]["dedup"]
    assert stats["dropped_against"] == {"books": 20} and stats["dropped_fuzzy"] == 6 and stats["kept"] == 40
    assert stats["documents"] == entries["web"]["documents"] + 26
    assert "curation" not in entries["wiki"]
    lines = [json.loads(x) for x in (data / stats["samples"]).read_text().splitlines()]
    against = [x for x in lines if x["reason"] == "against:books"]
    assert len(against) == 20 and all(x["kept"]["source"] == "books" for x in against)
    assert all(x["kept"]["excerpt"][:40] in "\n".join(world["books"]) for x in against)


def test_changing_one_source_re_prepares_it_and_those_deduplicated_against_it(
    world: dict, capsys: pytest.CaptureFixture
) -> None:
    config, data = str(world["config"]), world["data"]
    assert main(["prepare", config]) == 0
    capsys.readouterr()
    stamp = lambda n: (data / f"{n}.bin").stat().st_mtime_ns  # noqa: E731
    before = {n: stamp(n) for n in ("books", "web", "wiki")}
    assert main(["prepare", config, "data.sources.1.curation.dedup.threshold=0.95"]) == 0
    out = capsys.readouterr().out
    assert "preparing 1 of 3 sources" in out and "web: deduplicated" in out and "books: deduplicated" not in out
    assert stamp("books") == before["books"] and stamp("wiki") == before["wiki"] and stamp("web") != before["web"]
    # at 0.95 the near copies stay; the exact ones (Jaccard 1) still go
    entries = {e["name"]: e for e in read_manifest(data)["sources"]}  # type: ignore[index]
    assert entries["web"]["curation"]["dedup"]["dropped_against"] == {"books": 8}
    assert entries["web"]["settings"]["curation"]["dedup"]["threshold"] == 0.95
    before = {n: stamp(n) for n in ("books", "web", "wiki")}
    assert main(["prepare", config, "data.sources.0.curation.dedup.threshold=0.9"]) == 0  # web reads books' index
    out = capsys.readouterr().out
    assert "preparing 2 of 3 sources" in out and "books: deduplicated" in out and "web: deduplicated" in out
    assert stamp("wiki") == before["wiki"] and stamp("web") != before["web"]
    shingles = ["data.sources.0.curation.dedup.shingle=4", "data.sources.1.curation.dedup.shingle=4"]
    assert main(["prepare", config, *shingles]) == 0
    assert "preparing 2 of 3 sources" in capsys.readouterr().out and stamp("wiki") == before["wiki"]
    assert main(["prepare", config, *shingles]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_lost_index_re_prepares_its_source(world: dict, capsys: pytest.CaptureFixture) -> None:
    config, data = str(world["config"]), world["data"]
    assert main(["prepare", config]) == 0
    capsys.readouterr()
    index = data / "curation" / "books.dedup"
    (index / "meta.json").unlink()
    web = (data / "web.bin").stat().st_mtime_ns
    assert main(["prepare", config]) == 0
    # the index comes back as it was, so web, deduplicated against it, stays
    assert "preparing 1 of 3 sources" in capsys.readouterr().out and (index / "meta.json").is_file()
    assert (data / "web.bin").stat().st_mtime_ns == web


def test_workers_do_not_change_what_is_kept(world: dict, tmp_path: Path) -> None:
    outs = []
    for n in (1, 2):
        data = tmp_path / f"d{n}"
        assert main(["prepare", str(world["config"]), f"data.dir={data}", f"data.num_proc={n}"]) == 0
        outs.append([(data / f"{s}.bin").read_bytes() for s in ("books", "web")])
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("1.curation.dedup.bands=30", "data.sources.1.curation.dedup.bands (30) must divide"),
        ("1.curation.dedup.threshold=1.5", "data.sources.1.curation.dedup.threshold must be a Jaccard similarity"),
        ("0.curation.dedup.threshold=-0.1", "data.sources.0.curation.dedup.threshold must be a Jaccard similarity"),
        ("0.curation.dedup.shingle=0", "data.sources.0.curation.dedup.shingle must be a positive integer"),
        ("1.curation.dedup.num_hashes=-4", "data.sources.1.curation.dedup.num_hashes must be a positive integer"),
        (
            "1.curation.dedup.against=[news]",
            "data.sources.1.curation.dedup.against names 'news', which is not a source",
        ),
        ("0.curation.dedup.against=[web]", "data.sources.0.curation.dedup.against names 'web', which is not ranked"),
        ("0.curation.dedup.within=false", "data.sources.1.curation.dedup.against names 'books', which is not dedup"),
        (
            "0.curation.dedup.bands=16",
            "data.sources.1.curation.dedup.against names 'books', whose curation.dedup.bands",
        ),
    ],
)
def test_bad_dedup_settings_are_one_line_and_change_nothing(
    world: dict, setting: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    data = world["data"]
    if not (data / "manifest.json").exists():
        assert main(["prepare", str(world["config"])]) == 0
    listing = sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*"))
    capsys.readouterr()
    assert main(["prepare", str(world["config"]), f"data.sources.{setting}"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"scalegpt: error: {message}")
    assert sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*")) == listing


def test_short_documents_and_an_empty_source(tmp_path: Path) -> None:
    """A document shorter than a shingle is one shingle (its words' hash): equal words go, others stay."""
    same = ["a b", "a  b", "A B"]
    kept, step = run_step([*same, "a c", ""], tmp_path / "short")
    raw = lambda t: int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") & 0xFFFFFFFF  # noqa: E731
    assert kept == [min(same, key=raw), "a c", ""]  # of exact copies, the lowest raw-text hash stays
    assert (step.stats.dropped_exact, step.stats.dropped_fuzzy) == (2, 0)
    kept, step = run_step([], tmp_path / "empty")
    assert kept == [] and step.stats.documents == 0 and (tmp_path / "empty" / "index" / "meta.json").is_file()


def test_estimated_jaccard_is_the_same_across_chunks(tmp_path: Path) -> None:
    """Signatures are compared _SIG_CHUNK pairs at a time, read from their file: each pair's estimate is the
    fraction of equal values, computed here at once from the whole matrix."""
    from scalegpt.train.data.prepare.dedup import _SIG_CHUNK, _jaccard, _SigFile

    rng = np.random.default_rng(0)
    sig = rng.integers(0, 4, size=(300, 16), dtype=np.uint32)  # few values, so pairs agree on some of them
    sig.tofile(tmp_path / "sigs.u32")
    pairs = rng.integers(0, 300, size=(2 * _SIG_CHUNK + 7, 2))
    pairs[::100, 1] = pairs[::100, 0]  # a document with itself, in every chunk
    rows = _SigFile(tmp_path / "sigs.u32", 16)
    try:
        got = _jaccard(rows, rows, pairs)
    finally:
        rows.close()
    assert np.array_equal(got, (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1))
    assert got.min() < 0.5 < got.max() == 1.0
