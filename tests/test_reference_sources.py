"""data.reference_sources: text that curation reads (a quality filter's positives or negatives) and the mixture
never holds. Set as a user sets it (YAML, and key=value through the `scalegpt` executable), the classifier is
trained against it while no token file, manifest entry or draw of the trainer's mixture holds any of it; a
change to it retrains and re-prepares the filtered source alone; an unused one warns and is not read; each
mistake is one line that writes nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import SourceSpec
from scalegpt.train.data import builtin
from scalegpt.train.data import sources as src_mod
from scalegpt.train.data.mixture import Mixture, read_manifest
from scalegpt.train.data.prepare import quality

from helpers import decoded_documents

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"
needs_corpora = pytest.mark.skipif(
    not (CORPORA / "books_moby_dick.txt").is_file(), reason=f"the shared corpora are absent ({CORPORA})"
)
SCALEGPT = str(Path(sys.executable).with_name("scalegpt"))
TINY = """
run: {{dir: {root}/run, seed: 3}}
model: {{n_layer: 1, n_head: 2, d_model: 32, n_ctx: 64, vocab_size: 300}}
train: {{global_batch: 8, micro_batch: 8}}
data:
  dir: {root}/data
  tokenizer_sample_mb: 0.05
  num_proc: 1
"""


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalegpt: error: "), err
    return err[0]


def test_bad_reference_sources_are_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "r.yaml"
    config.write_text(
        TINY.format(root=tmp_path)
        + textwrap.indent(
            textwrap.dedent(
                """
                sources:
                  - {name: prose, builtin: prose, builtin_mb: 0.03}
                  - {name: web, builtin: scramble, builtin_mb: 0.03}
                reference_sources:
                  - {name: junk, builtin: junk, builtin_mb: 0.05}
                """
            ),
            "  ",
        )
    )
    quality_ = "data.sources.1.curation.quality"
    missing = tmp_path / "missing.txt"
    cases = [
        (["data.reference_sources.0.weight=0.1"], "no such key ('weight' is not in ReferenceSourceConfig)"),
        (["data.reference_sources=[{name: junk, builtin: junk, curation: {}}]"], "Key 'curation' not in"),
        (
            ["data.reference_sources.0.name=prose"],
            "data.reference_sources.0.name in the command line: duplicate source name 'prose' (data.sources.0 has "
            "it); names must be unique over data.sources and data.reference_sources",
        ),
        (["data.reference_sources.0.builtin=null"], "source 'junk' needs exactly one of path, hf or builtin"),
        (
            ["data.stages=[{start_tokens: 100, weights: {prose: 1, junk: 1}}]"],
            "names ['junk'], which are not in data.sources (['prose', 'web']); junk: a reference source is read by "
            "curation only, never drawn",
        ),
        (
            [f"{quality_}.positives=[prose,books]"],
            f"{quality_}.positives: no source named 'books' in data.sources or data.reference_sources (sources: "
            "prose, web; reference sources: junk)",
        ),
        (  # a reference source that a classifier reads is resolved before anything is written
            [
                f"{quality_}.positives=[prose]",
                f"{quality_}.negatives=[junk]",
                "data.reference_sources.0.builtin=null",
                f"data.reference_sources.0.path={missing}",
            ],
            "source 'junk'",
        ),
    ]
    for overrides, message in cases:
        line = one_error_line(capsys, ["prepare", str(config), *overrides])
        assert message in line, (overrides, line)
    assert str(missing) in line  # the last case names the missing file
    config.write_text(config.read_text().replace("builtin_mb: 0.05}", "builtin_mb: 0.05, weight: 0.01}"))
    line = one_error_line(capsys, ["prepare", str(config)])  # a weight set in YAML, as the old way had it
    assert f"in {config}: Key 'weight' not in 'ReferenceSourceConfig'" in line
    assert not (tmp_path / "data").exists()


def test_an_unused_reference_source_is_not_read_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "r.yaml"
    config.write_text(
        TINY.format(root=tmp_path)
        + "  sources: [{name: prose, builtin: prose, builtin_mb: 0.03}]\n"
        + f"  reference_sources: [{{name: junk, path: {tmp_path / 'not-there.txt'}}}]\n"
    )
    assert main(["prepare", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: reference source 'junk' is not read: no quality step trains on it" in out
    manifest = read_manifest(tmp_path / "data")
    assert manifest is not None and [e["name"] for e in manifest["sources"]] == ["prose"]
    assert "mixture of 1 sources" in out


def test_positives_and_negatives_may_both_be_reference_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "r.yaml"
    config.write_text(
        TINY.format(root=tmp_path)
        + textwrap.indent(
            textwrap.dedent(
                """
                sources:
                  - name: web
                    builtin: scramble
                    builtin_mb: 0.05
                    curation: {quality: {positives: [good], negatives: [junk], max_examples: 100}}
                reference_sources:
                  - {name: good, builtin: prose, builtin_mb: 0.1}
                  - {name: junk, builtin: junk, builtin_mb: 0.1}
                """
            ),
            "  ",
        )
    )
    assert main(["prepare", str(config)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "data" / "curation" / "quality-web.json").read_text())
    assert saved["training"]["sources"] == {"positives": ["good"], "negatives": ["junk"]}
    assert "reference source" not in out and "web: quality filter: kept" in out
    manifest = read_manifest(tmp_path / "data")
    assert manifest is not None and [e["name"] for e in manifest["sources"]] == ["web"]
    assert [p.name for p in (tmp_path / "data").glob("*.bin")] == ["web.bin"]


# --- a negative set given on the command line, through the scalegpt executable ---------------------------


def crawl_documents() -> list[str]:
    """A stand-in for raw web text: web prose in pieces of about 800 characters, and junk of another seed than
    the reference set's."""
    web, docs, at = (CORPORA / "web_fineweb_edu_sample.txt").read_text(), [], 0
    while len(docs) < 80:
        end = web.index("\n", at + 800)
        docs.append(web[at:end].strip())
        at = end
    docs += list(builtin.generate("junk", 0.05, seed=11))
    random.Random(0).shuffle(docs)
    return docs


def prepare(argv: list[str]) -> str:
    out = subprocess.run([SCALEGPT, "prepare", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow  # two real prepares through the executable, each training a classifier
@needs_corpora
def test_a_reference_negative_set_trains_the_classifier_and_never_the_model(tmp_path: Path) -> None:
    books = CORPORA / "books_moby_dick.txt"
    (tmp_path / "books.txt").write_text(books.read_text()[:120_000])
    docs = crawl_documents()
    (tmp_path / "crawl.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = tmp_path / "r.yaml"
    config.write_text(
        TINY.format(root=tmp_path)
        + textwrap.indent(
            textwrap.dedent(
                f"""
                sources:
                  - {{name: books, path: {tmp_path / "books.txt"}, weight: 0.4}}
                  - name: crawl
                    path: {tmp_path / "crawl.jsonl"}
                    weight: 0.6
                    curation: {{quality: {{positives: [books], max_examples: 200}}}}
                """
            ),
            "  ",
        )
    )
    junk_mb = 0.2
    overrides = [
        f"data.reference_sources=[{{name: junk, builtin: junk, builtin_mb: {junk_mb}}}]",
        "data.sources.1.curation.quality.negatives=[junk]",
    ]
    out = prepare([str(config), *overrides])
    junk = list(builtin.generate("junk", junk_mb))
    data = tmp_path / "data"
    examples = sorted(quality.example_of(t) for t in quality.cut_examples((d, True) for d in junk))[:200]
    trained = sum(e.split % quality.HELDOUT != 0 for e in examples)  # the junk's sample less those held out
    assert "crawl: trained a quality classifier" in out and f"against {trained} of junk" in out
    manifest = read_manifest(data)
    assert manifest is not None and [e["name"] for e in manifest["sources"]] == ["books", "crawl"]
    assert sorted(p.name for p in data.glob("*.bin")) == ["books.bin", "crawl.bin"]
    prepared = decoded_documents(data, "books") + decoded_documents(data, "crawl")
    assert not set(junk) & set(prepared)
    entry = next(e for e in manifest["sources"] if e["name"] == "crawl")
    row = entry["curation"]["quality"]
    assert decoded_documents(data, "books") == [(tmp_path / "books.txt").read_text()]
    assert len(decoded_documents(data, "crawl")) == row["kept"] == row["documents"] - row["dropped"] < len(docs)
    assert set(decoded_documents(data, "crawl")) <= set(docs)

    def trained_on(mb: float) -> tuple[dict, str]:
        saved = json.loads((data / "curation" / "quality-crawl.json").read_text())
        cfg = load_config(config, [*overrides, f"data.reference_sources.0.builtin_mb={mb}"])
        negatives = [src_mod.resolve(SourceSpec(name="junk", builtin="junk", builtin_mb=mb))]
        key = quality.training_key(
            cfg.data.sources[1].curation.quality, [src_mod.resolve(cfg.data.sources[0])], negatives, cfg.data
        )
        return saved, key

    saved, key = trained_on(junk_mb)
    assert saved["training"]["sources"] == {"positives": ["books"], "negatives": ["junk"]}
    assert saved["training"]["key"] == key and saved["fingerprint"] == row["classifier"]

    # the trainer's mixture and its draws: books and crawl only
    cfg = load_config(config, overrides)
    assert Mixture.for_config(cfg).names == ["books", "crawl"]
    report = tmp_path / "inspect.json"
    inspect = [SCALEGPT, "inspect", str(config), *overrides, "--steps", "1:5", "--json", str(report)]
    done = subprocess.run(inspect, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    drawn = json.loads(report.read_text())
    assert list(drawn["sources"]) == ["books", "crawl"] and drawn["samples"] == 4 * 8
    assert sum(s["count"] for s in drawn["sources"].values()) == drawn["samples"]

    # a changed reference set retrains and re-prepares the filtered source alone
    stamp = (data / "books.bin").stat().st_mtime_ns
    out = prepare([str(config), *overrides, "data.reference_sources.0.builtin_mb=0.25"])
    assert "crawl: trained a quality classifier" in out and "preparing 1 of 2 sources" in out
    saved, key = trained_on(0.25)
    assert saved["training"]["key"] == key
    assert (data / "books.bin").stat().st_mtime_ns == stamp
