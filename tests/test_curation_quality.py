"""`scalegpt prepare`'s quality filter (GPT-3 Appendix A): the Pareto rule's keep rate against (2 - s)^-alpha and
numpy's own pareto; the classifier on real prose against generated junk, its AUC checked by a rank count by
hand; and the step set as a user sets it (YAML plus key=value through the CLI, the junk a reference source
that the classifier reads and no token file holds), its decisions recomputed from the saved classifier with
scikit-learn and numpy alone, the same whatever the order of documents and the
number of workers, a saved classifier reused, and each bad setting one line that changes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from scalegpt.launch.cli import main
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import DataConfig, SourceConfig, SourceSpec
from scalegpt.train.data import builtin
from scalegpt.train.data import sources as src_mod
from scalegpt.train.data.mixture import Mixture, read_manifest
from scalegpt.train.data.prepare import quality

from helpers import decoded_documents

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"
needs_corpora = pytest.mark.skipif(
    not (CORPORA / "wiki_wikitext2_valid.txt").is_file(), reason=f"the shared corpora are absent ({CORPORA})"
)


# --- the rule -----------------------------------------------------------------------------------------


def test_pareto_rule_keeps_two_minus_s_to_the_minus_nine() -> None:
    docs = [f"document number {i}" for i in range(100_000)]
    draws = quality.pareto_draws(docs, 9.0)
    numpy_draws = np.random.default_rng(0).pareto(9.0, len(docs))  # the paper's np.random.pareto
    for s in (0.0, 0.5, 0.9, 1.0):
        scores = np.full(len(docs), s)
        kept = quality.pareto_keep(scores, draws).mean()
        assert abs(kept - (2 - s) ** -9) < 0.01, (s, kept)
        assert abs(kept - np.mean(numpy_draws > 1 - s)) < 0.01, (s, kept)
        rule = quality.KeepRule("pareto", 9.0, 0.5)
        assert np.array_equal(rule.decide(scores, docs)[0], quality.pareto_keep(scores, draws))
    assert 0.41 < np.mean(draws > 0.1) < 0.43  # s = 0.9: the paper's 0.42


def test_a_document_draws_the_same_whatever_the_order() -> None:
    docs = [builtin.junk_document(random.Random(i)) for i in range(500)]
    order = list(range(len(docs)))
    random.Random(1).shuffle(order)
    draws = quality.pareto_draws(docs, 9.0)
    again = quality.pareto_draws([docs[i] for i in order], 9.0)
    assert np.array_equal(again, draws[order])
    assert quality.pareto_draws(docs[:7], 9.0).tolist() == draws[:7].tolist()  # and whatever the batch
    rule = quality.KeepRule("threshold", 9.0, 0.7)
    assert rule.decide(np.array([0.69, 0.7, 0.71]), ["a", "b", "c"])[0].tolist() == [False, True, True]


def test_training_sample_does_not_depend_on_the_order_of_sources() -> None:
    data = DataConfig()
    a = src_mod.resolve(SourceConfig(name="a", builtin="junk", builtin_mb=0.05))
    b = src_mod.resolve(SourceConfig(name="b", builtin="prose", builtin_mb=0.05))
    ab, ba = quality.sample([a, b], data, 60), quality.sample([b, a], data, 60)
    assert [e.text for e in ab] == [e.text for e in ba] and len(ab) == 60
    everything = sorted(
        quality.example_of(t) for t in [*builtin.generate("junk", 0.05), *builtin.generate("prose", 0.05)]
    )
    assert [e.key for e in ab] == [e.key for e in everything[:60]]  # the lowest keys of all


# --- the classifier -----------------------------------------------------------------------------------


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half: the Mann-Whitney count, by hand."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    above = sum(int(np.sum(p > neg)) + 0.5 * int(np.sum(p == neg)) for p in pos)
    return above / (len(pos) * len(neg))


@needs_corpora
def test_classifier_separates_books_and_wiki_from_junk() -> None:
    data = DataConfig()
    positives = [
        src_mod.resolve(SourceConfig(name="books", path=str(CORPORA / "books_*.txt"))),
        src_mod.resolve(SourceConfig(name="wiki", path=str(CORPORA / "wiki_wikitext2_valid.txt"))),
    ]
    junk = [src_mod.resolve(SourceConfig(name="junk", builtin="junk", builtin_mb=2.0))]
    pos, neg = quality.sample(positives, data, 1000), quality.sample(junk, data, 1000)
    clf = quality.train(quality.Features(1 << 18, 2), pos, neg, {"sources": {}})
    m = clf.metrics
    assert m["auc"] >= 0.95 and m["heldout_positives"] >= 50 and m["heldout_negatives"] >= 50, m

    held = [(e.text, y) for y, part in ((1, pos), (0, neg)) for e in part if e.split % quality.HELDOUT == 0]
    labels = np.array([y for _, y in held])
    scores = clf.scores([t for t, _ in held])
    assert len(held) == m["heldout_positives"] + m["heldout_negatives"]
    assert rank_auc(labels, scores) == pytest.approx(m["auc"], abs=1e-12)
    assert np.mean((scores >= 0.5) == (labels == 1)) == pytest.approx(m["accuracy"], abs=1e-12)


# --- prepare, as a user runs it -----------------------------------------------------------------------

QUALITY = "data.sources.2.curation.quality"


@dataclass
class World:
    root: Path
    config: Path
    data: Path
    docs: list[str]
    """The crawl source's documents, in file order."""
    out: str
    """What the first prepare printed."""


def _config(root: Path, data: Path, crawl: Path) -> str:
    return textwrap.dedent(
        f"""
        run: {{dir: {root / "run"}, seed: 3}}
        model: {{n_layer: 1, n_head: 2, d_model: 32, n_ctx: 64, vocab_size: 300}}
        train: {{global_batch: 8, micro_batch: 8}}
        data:
          dir: {data}
          tokenizer: bpe
          tokenizer_sample_mb: 0.1
          val_fraction: 0.02
          num_proc: 1
          reference_sources:
            - {{name: junk, builtin: junk, builtin_mb: 0.3}}
          sources:
            - {{name: books, path: {root / "books.txt"}, weight: 0.3}}
            - {{name: wiki, path: {root / "wiki.txt"}, weight: 0.2}}
            - name: crawl
              path: {crawl}
              weight: 0.5
              curation:
                quality: {{positives: [books, wiki], negatives: [junk], max_examples: 300}}
        """
    )


def _head(path: Path, chars: int) -> str:
    text = path.read_text()
    return text[: text.index("\n", chars) + 1]


def crawl_documents() -> list[str]:
    """A stand-in for raw Common Crawl: web prose in pieces of about 800 characters, and junk."""
    web, docs, at = (CORPORA / "web_fineweb_edu_sample.txt").read_text(), [], 0
    while len(docs) < 150:
        end = web.index("\n", at + 800)
        docs.append(web[at:end].strip())
        at = end
    docs += list(builtin.generate("junk", 0.1, seed=11))
    random.Random(0).shuffle(docs)
    return docs


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    if not (CORPORA / "wiki_wikitext2_valid.txt").is_file():
        pytest.skip(f"the shared corpora are absent ({CORPORA})")
    root = tmp_path_factory.mktemp("quality")
    (root / "books.txt").write_text(_head(CORPORA / "books_moby_dick.txt", 150_000))
    (root / "wiki.txt").write_text(_head(CORPORA / "wiki_wikitext2_valid.txt", 150_000))
    docs = crawl_documents()
    write_jsonl(root / "crawl.jsonl", docs)
    config = root / "q.yaml"
    config.write_text(_config(root, root / "data", root / "crawl.jsonl"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["prepare", str(config), f"{QUALITY}.alpha=6"]) == 0
    return World(root, config, root / "data", docs, buf.getvalue())


def expected(data: Path, docs: list[str], rule: dict) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, scores) recomputed from the saved classifier's files with scikit-learn and numpy alone."""
    from sklearn.feature_extraction.text import HashingVectorizer

    saved = json.loads((data / "curation" / "quality-crawl.json").read_text())
    weights = np.load(data / "curation" / saved["weights"])
    f = saved["features"]
    hv = HashingVectorizer(
        n_features=f["n_features"],
        ngram_range=tuple(f["ngram_range"]),
        token_pattern=f["token_pattern"],
        norm="l2",
        alternate_sign=False,
    )
    z = hv.transform(docs) @ weights["coef"] + weights["intercept"][0]
    scores = 1 / (1 + np.exp(-z))
    if rule["keep"] == "threshold":
        return scores >= rule["threshold"], scores
    # pareto(alpha) > 1 - s, with the draw (1 - u)^(-1/alpha) - 1, is u > 1 - (2 - s)^-alpha
    u = np.array(
        [
            (
                int.from_bytes(
                    hashlib.blake2b(d.encode(), digest_size=16, person=b"quality-draw").digest()[:8], "little"
                )
                >> 11
            )
            / 2**53
            for d in docs
        ]
    )
    return u > 1 - (2 - scores) ** -rule["alpha"], scores


def crawl_entry(data: Path) -> dict:
    manifest = read_manifest(data)
    assert manifest is not None
    return next(e for e in manifest["sources"] if e["name"] == "crawl")


def test_prepare_keeps_what_the_saved_classifier_scores(world: World) -> None:
    entry = crawl_entry(world.data)
    assert entry["settings"]["curation"]["quality"]["alpha"] == 6  # the key=value override
    row = entry["curation"]["quality"]
    kept, scores = expected(world.data, world.docs, row["rule"])
    assert 0 < kept.sum() < len(world.docs)
    assert decoded_documents(world.data, "crawl") == [d for d, k in zip(world.docs, kept, strict=True) if k]
    assert (row["documents"], row["kept"], row["dropped"]) == (len(world.docs), kept.sum(), (~kept).sum())
    assert row["bytes"] == sum(len(d.encode()) for d in world.docs)
    assert row["bytes_kept"] == sum(len(d.encode()) for d, k in zip(world.docs, kept, strict=True) if k)
    assert row["histogram"] == np.histogram(scores, bins=20, range=(0, 1))[0].tolist()
    assert row["kept_histogram"] == np.histogram(scores[kept], bins=20, range=(0, 1))[0].tolist()
    dropped = [i for i in range(len(world.docs)) if not kept[i]][:100]
    assert [d["text"] for d in row["dropped_sample"]] == [world.docs[i][:400] for i in dropped]
    assert [d["score"] for d in row["dropped_sample"]] == pytest.approx(scores[dropped].tolist(), abs=1e-9)
    assert (world.data / row["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((world.data / "curation" / "quality-crawl.json").read_text())
    m = saved["metrics"]
    assert entry["settings"]["curation"]["quality"]["classifier"] == saved["fingerprint"] == row["classifier"]
    assert f"held-out AUC {m['auc']:.4f}, accuracy {m['accuracy']:.4f}" in world.out
    assert m["auc"] >= 0.95
    assert f"crawl: quality filter: kept {kept.sum():,} of {len(world.docs):,} documents" in world.out


def test_the_reference_junk_is_trained_against_and_never_tokenized(world: World) -> None:
    manifest = read_manifest(world.data)
    assert manifest is not None and [e["name"] for e in manifest["sources"]] == ["books", "wiki", "crawl"]
    assert sorted(p.name for p in world.data.glob("*.bin")) == ["books.bin", "crawl.bin", "wiki.bin"]
    kept, _ = expected(world.data, world.docs, crawl_entry(world.data)["curation"]["quality"]["rule"])
    prepared = {name: decoded_documents(world.data, name) for name in ("books", "wiki", "crawl")}
    assert prepared == {  # every token decodes to the mixture's own text, and nothing else
        "books": [(world.root / "books.txt").read_text()],
        "wiki": [(world.root / "wiki.txt").read_text()],
        "crawl": [d for d, k in zip(world.docs, kept, strict=True) if k],
    }
    junk = list(builtin.generate("junk", 0.3))
    assert not set(junk) & {d for docs in prepared.values() for d in docs}

    saved = json.loads((world.data / "curation" / "quality-crawl.json").read_text())
    assert saved["training"]["sources"] == {"positives": ["books", "wiki"], "negatives": ["junk"]}
    cfg = load_config(world.config, [f"{QUALITY}.alpha=6"])
    positives = [src_mod.resolve(s) for s in cfg.data.sources[:2]]
    negatives = [src_mod.resolve(SourceSpec(name="junk", builtin="junk", builtin_mb=0.3))]
    q = cfg.data.sources[2].curation.quality
    assert saved["training"]["key"] == quality.training_key(q, positives, negatives, cfg.data)
    m = saved["metrics"]
    examples = [quality.example_of(t) for t in quality.cut_examples((d, True) for d in junk)]
    assert m["train_negatives"] + m["heldout_negatives"] == min(len(examples), q.max_examples) == 300
    assert m["heldout_negatives"] == sum(e.split % quality.HELDOUT == 0 for e in sorted(examples)[:300])

    mixture = Mixture.for_config(cfg)
    assert mixture.names == ["books", "wiki", "crawl"]
    assert mixture.weights.tolist() == pytest.approx([0.3, 0.2, 0.5])
    assert f"mixture of 3 sources in {world.data}" in world.out


def test_rerun_does_nothing_and_an_identical_retrain_re_prepares_nothing(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    token_file = world.data / "crawl.bin"
    stamp = token_file.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["prepare", str(world.config), f"{QUALITY}.alpha=6"]) == 0
    out = capsys.readouterr().out
    assert "quality classifier" in out and "trained" not in out and "nothing to do" in out
    saved = world.data / "curation" / "quality-crawl.json"
    before = json.loads(saved.read_text())
    saved.unlink()
    assert main(["prepare", str(world.config), f"{QUALITY}.alpha=6"]) == 0
    out = capsys.readouterr().out
    assert "crawl: trained a quality classifier" in out and "nothing to do" in out
    assert json.loads(saved.read_text())["fingerprint"] == before["fingerprint"]
    assert token_file.stat().st_mtime_ns == stamp


def test_saved_classifier_reused_whatever_the_order_and_workers(world: World, capsys: pytest.CaptureFixture) -> None:
    root = world.root / "reuse"
    root.mkdir()
    order = list(range(len(world.docs)))
    random.Random(5).shuffle(order)
    write_jsonl(root / "crawl.jsonl", [world.docs[i] for i in order])
    shutil.copy(world.root / "books.txt", root / "books.txt")
    (root / "wiki.txt").write_text(_head(CORPORA / "drama_tinyshakespeare.txt", 20_000))  # not read: not trained
    config = root / "q.yaml"
    config.write_text(_config(root, root / "data", root / "crawl.jsonl"))
    saved = world.data / "curation" / "quality-crawl.json"
    capsys.readouterr()
    assert main(["prepare", str(config), f"{QUALITY}.alpha=6", f"{QUALITY}.classifier={saved}", "data.num_proc=2"]) == 0
    out = capsys.readouterr().out
    assert "trained a quality classifier" not in out and f"from {saved}" in out
    first, again = crawl_entry(world.data), crawl_entry(root / "data")
    assert again["settings"]["curation"] == first["settings"]["curation"]
    assert sorted(decoded_documents(root / "data", "crawl")) == sorted(decoded_documents(world.data, "crawl"))
    assert not (root / "data" / "curation" / "quality-crawl.json").exists()  # nothing trained, nothing saved

    over = [f"{QUALITY}.classifier={saved}", f"{QUALITY}.keep=threshold", f"{QUALITY}.threshold=0.9"]
    assert main(["prepare", str(config), *over]) == 0
    assert "preparing 1 of 3 sources" in capsys.readouterr().out
    docs = [world.docs[i] for i in order]
    kept, _ = expected(world.data, docs, {"keep": "threshold", "threshold": 0.9})
    assert decoded_documents(root / "data", "crawl") == [d for d, k in zip(docs, kept, strict=True) if k]
    assert crawl_entry(root / "data")["settings"]["curation"]["quality"]["threshold"] == 0.9


@pytest.mark.slow  # trains the classifier again and prepares two sources again
def test_a_changed_positive_source_re_prepares_the_filtered_one(world: World, capsys: pytest.CaptureFixture) -> None:
    root = world.root / "changed"
    shutil.copytree(world.root, root, ignore=shutil.ignore_patterns("reuse", "changed", "run"))
    config = root / "q.yaml"
    config.write_text(_config(root, root / "data", root / "crawl.jsonl"))
    assert main(["prepare", str(config), f"{QUALITY}.alpha=6"]) == 0  # copied mtimes: everything re-made once
    with open(root / "wiki.txt", "a") as f:
        f.write(_head(CORPORA / "books_pride_and_prejudice.txt", 20_000))
    capsys.readouterr()
    assert main(["prepare", str(config), f"{QUALITY}.alpha=6"]) == 0
    out = capsys.readouterr().out
    assert "crawl: trained a quality classifier" in out and "preparing 2 of 3 sources" in out
    assert "crawl: quality filter: kept" in out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_quality_settings_are_one_line_and_change_nothing(world: World, capsys: pytest.CaptureFixture) -> None:
    bad = world.root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "garbage.json").write_text("{not json")
    saved = (world.data / "curation" / "quality-crawl.json").read_text()
    (bad / "quality-x.json").write_text(saved.replace('"quality-crawl.npz"', '"quality-x.npz"'))
    (bad / "quality-x.npz").write_bytes(b"damaged")
    before = snapshot(world.data)
    cases = [
        (
            "positives=[books,web]",
            "positives: no source named 'web' in data.sources or data.reference_sources (sources: books, wiki, "
            "crawl; reference sources: junk)",
        ),
        ("negatives=[nothing]", "negatives: no source named 'nothing' in data.sources or data.reference_sources"),
        ("alpha=0", "alpha must be a number greater than 0 (the paper's is 9), got 0.0"),
        ("alpha=-2", "alpha must be a number greater than 0 (the paper's is 9), got -2.0"),
        ("positives=[books,books_]", "positives: no source named 'books_'"),
        ("max_examples=1", "max_examples must be at least 2, got 1"),
        ("positives=[crawl]", "positives: the filtered source 'crawl' cannot be its own positive"),
        ("threshold=1.5", "threshold must be in [0, 1] (a classifier score), got 1.5"),
        ("threshold=-0.1", "threshold must be in [0, 1] (a classifier score), got -0.1"),
        ("keep=coin", "keep must be 'pareto' or 'threshold', got 'coin'"),
        ("classifier=" + str(bad / "missing.json"), f"classifier: {bad / 'missing.json'} does not load: "),
        ("classifier=" + str(bad / "garbage.json"), f"classifier: {bad / 'garbage.json'} does not load: not JSON"),
        ("classifier=" + str(bad / "quality-x.json"), "does not load: its weights quality-x.npz do not load"),
    ]
    for setting, message in cases:
        extra = [f"{QUALITY}.keep=threshold"] if setting.startswith("threshold=1") else []
        assert main(["prepare", str(world.config), f"{QUALITY}.{setting}", *extra]) == 2, setting
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("scalegpt: error: ") and message in err[0], (setting, err)
        assert QUALITY in err[0]
    assert snapshot(world.data) == before


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.slow  # a real prepare, killed while it tokenizes a large source after the filtered one
def test_kill_9_after_the_filtered_source_resumes_without_filtering_it_again(world: World) -> None:
    root = world.root / "killed"
    root.mkdir()
    data = root / "data"

    def config(big_mb: float) -> Path:
        text = _config(world.root, data, world.root / "crawl.jsonl").replace("tokenizer: bpe", "tokenizer: gpt2")
        text = text.replace("vocab_size: 300", "vocab_size: 50257")
        text += f"    - {{name: big, builtin: prose, builtin_mb: {big_mb}, weight: 0.1}}\n"
        (root / "q.yaml").write_text(text)
        return root / "q.yaml"

    argv = [str(Path(sys.executable).with_name("scalegpt")), "prepare", str(config(30.0)), f"{QUALITY}.alpha=6"]
    proc = psutil.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: any(p.stat().st_size > 0 for p in data.glob(".prepare-tmp-*/big.bin") if p.exists()), "big.bin")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (data / "manifest.json").exists() and not (data / "curation").exists()

    argv[2] = str(config(0.2))
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "crawl: taking over the tokens an interrupted run had finished" in out.stdout
    assert "crawl: quality filter" not in out.stdout  # not filtered again
    row = crawl_entry(data)["curation"]["quality"]
    kept, _ = expected(data, world.docs, row["rule"])
    assert row["kept"] == kept.sum() and row["documents"] == len(world.docs)
    assert decoded_documents(data, "crawl") == [d for d, k in zip(world.docs, kept, strict=True) if k]
    assert (data / row["figure"]).is_file() and (data / "curation" / "quality-crawl.json").is_file()
