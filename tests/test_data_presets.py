"""Presets as a user meets them: found by name from any directory, GPT-2's tokenizer by name, corpora
downloaded and checked against their sha256, the SCALEGPT_DATA_ROOT mirror that keeps CI offline, and the
paper's curation as the gpt3 and curated-mix presets declare it (curated-mix prepared offline, its rows
checked against the files; the gpt3 stand-ins with WebText2 pages copied into the crawl, where dedup drops
the crawl's copies and keeps WebText2's)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from scalegpt.launch.cli import main
from scalegpt.train.config.loading import PACKAGED_CONFIGS, load_config
from scalegpt.train.data import builtin
from scalegpt.train.data import sources as src_mod
from scalegpt.train.data.prepare import decontaminate, dedup, quality
from scalegpt.train.data.tokenizer import PACKAGED_TOKENIZERS, load_tokenizer
from scalegpt.train.errors import UserError
from scalegpt.train.evaluation.tasks import TASKS, queries

from conftest import CONFIGS
from helpers import decoded_documents

GPT2_MODEL = {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 16, "vocab_size": 50257}


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("scalegpt: error: "), err
    return err


def write_run(path: Path, data: dict, vocab_size: int = 50257) -> Path:
    model = {**GPT2_MODEL, "vocab_size": vocab_size}
    path.write_text(json.dumps({"model": model, "data": data, "train": {"max_steps": 10, "micro_batch": 4}}))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, str]:
    """A small text file and its sha256."""
    rng = random.Random(7)
    text = "\n\n".join(builtin.prose_document(rng) for _ in range(40))
    path = tmp_path / "upstream" / "stories.txt"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    return path, hashlib.sha256(text.encode()).hexdigest()


def downloaded_source(url: str, sha: str | None) -> dict:
    return {"name": "stories", "path": "corpora/stories.txt", "download": [f"{url}#sha256={sha}" if sha else url]}


# --- presets by name, from anywhere ------------------------------------------------------------------------


def test_no_preset_names_the_shared_folder() -> None:
    for path in CONFIGS.rglob("*.yaml"):
        assert "shared" not in path.read_text(), path


def test_a_packaged_preset_by_name_from_another_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "smoke", "--dry-run"]) == 0
    assert "zero_optimization" in capsys.readouterr().out
    by_path = load_config("configs/smoke.yaml")  # the README's spelling works from here too
    assert by_path == load_config("smoke") and by_path.run.dir == "runs/smoke"
    assert load_config("gpt3-small").model.d_model == 768


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()  # say, where the user keeps the smoke job's outputs
    assert load_config("smoke").run.dir == "runs/smoke"
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="mine is a directory"):
        load_config("mine")


def test_a_file_in_the_working_directory_wins_over_the_packaged_preset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text("defaults:\n  model: tiny\n  data: builtin\nrun:\n  dir: mine\n")
    assert load_config("configs/smoke.yaml").run.dir == "mine"
    assert load_config("smoke").run.dir == "runs/smoke"


def test_a_run_file_anywhere_composes_packaged_presets(tmp_path: Path) -> None:
    run = tmp_path / "deep" / "run.yaml"
    run.parent.mkdir()
    run.write_text("defaults:\n  model: nano\n  data: gpt3\n")
    cfg = load_config(run)
    assert cfg.data.tokenizer == "gpt2" and cfg.model.n_layer > 0
    assert (PACKAGED_CONFIGS / "data" / "gpt3.yaml").is_file()


def test_unknown_preset_names_the_packaged_ones(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, ["train", "smok", "--dry-run"])
    assert "config file smok does not exist" in line and "smoke" in line and "gpt3-small" in line
    (tmp_path / "run.yaml").write_text("defaults:\n  model: tiniest\n")
    line = one_error_line(capsys, ["train", "run.yaml", "--dry-run"])
    assert "defaults.model" in line and "tiny" in line


# --- GPT-2's tokenizer ships in the package ---------------------------------------------------------------


def test_packaged_gpt2_files_equal_the_shared_copy(shared_data: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        assert (PACKAGED_TOKENIZERS["gpt2"] / name).read_bytes() == (shared_data / "gpt2_tokenizer" / name).read_bytes()


# --- downloads and their checksums ----------------------------------------------------------------------


def test_download_is_checked_and_prepared(corpus, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SCALEGPT_DATA_ROOT")
    path, sha = corpus
    url = path.as_uri()
    data = {"dir": str(tmp_path / "p"), "tokenizer": "gpt2", "sources": [downloaded_source(url, sha)]}
    assert main(["prepare", str(write_run(tmp_path / "run.json", data))]) == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["tokenizer_recipe"] == {"kind": "packaged", "name": "gpt2"}
    (s,) = m["sources"]
    assert s["spec"] == url and s["bytes"] == len(path.read_bytes())
    ids = np.fromfile(tmp_path / "p" / s["file"], dtype=m["dtype"])
    assert ids[-1] == m["eot_id"] and load_tokenizer("gpt2").decode(ids[:-1].tolist()) == path.read_text()


def test_a_wrong_checksum_stops_before_anything_is_written(corpus, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SCALEGPT_DATA_ROOT")
    path, sha = corpus
    wrong = "0" * 64
    data = {"dir": str(tmp_path / "p"), "tokenizer": "gpt2", "sources": [downloaded_source(path.as_uri(), wrong)]}
    line = one_error_line(capsys, ["prepare", str(write_run(tmp_path / "run.json", data))])
    assert f"source 'stories': {path.as_uri()} has sha256 {sha}, not the {wrong}" in line
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("file:///nowhere/stories.txt", "cannot download file:///nowhere/stories.txt"),
        ("file:///nowhere/stories.txt#md5=abc", "must end in #sha256=<64 hex digits>"),
    ],
)
def test_bad_download_entries_are_one_line(entry: str, expected: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SCALEGPT_DATA_ROOT")
    source = {"name": "stories", "path": "corpora/stories.txt", "download": [entry]}
    data = {"dir": str(tmp_path / "p"), "tokenizer": "gpt2", "sources": [source]}
    assert expected in one_error_line(capsys, ["prepare", str(write_run(tmp_path / "run.json", data))])


def test_download_goes_with_path_only(tmp_path: Path, capsys) -> None:
    source = {"name": "prose", "builtin": "prose", "download": ["file:///nowhere/prose.txt"]}
    data = {"dir": str(tmp_path / "p"), "tokenizer": "gpt2", "sources": [source]}
    line = one_error_line(capsys, ["prepare", str(write_run(tmp_path / "run.json", data))])
    assert "source 'prose': download: goes with path:" in line


# --- SCALEGPT_DATA_ROOT: the offline mirror --------------------------------------------------------------


def test_data_root_is_read_instead_of_downloading(corpus, tmp_path: Path, monkeypatch) -> None:
    path, sha = corpus
    small_bpe = {"tokenizer": "bpe", "tokenizer_sample_mb": 0.1}  # trained alike both times, and fast
    monkeypatch.delenv("SCALEGPT_DATA_ROOT")
    fetched = {"dir": str(tmp_path / "fetched"), **small_bpe, "sources": [downloaded_source(path.as_uri(), sha)]}
    assert main(["prepare", str(write_run(tmp_path / "a.json", fetched, vocab_size=300))]) == 0
    root = tmp_path / "mirror"
    (root / "corpora").mkdir(parents=True)
    (root / "corpora" / "stories.txt").write_bytes(path.read_bytes())
    monkeypatch.setenv("SCALEGPT_DATA_ROOT", str(root))
    gone = "file:///nowhere/stories.txt"  # would fail, were it downloaded
    mirrored = {"dir": str(tmp_path / "mirrored"), **small_bpe, "sources": [downloaded_source(gone, sha)]}
    assert main(["prepare", str(write_run(tmp_path / "b.json", mirrored, vocab_size=300))]) == 0
    name = json.loads((tmp_path / "mirrored" / "manifest.json").read_text())["sources"][0]["file"]
    assert (tmp_path / "mirrored" / name).read_bytes() == (tmp_path / "fetched" / name).read_bytes()


def test_data_root_missing_or_different_files_are_one_line(corpus, tmp_path: Path, monkeypatch, capsys) -> None:
    path, sha = corpus
    root = tmp_path / "mirror"
    monkeypatch.setenv("SCALEGPT_DATA_ROOT", str(root))
    data = {"dir": str(tmp_path / "p"), "tokenizer": "gpt2", "sources": [downloaded_source(path.as_uri(), sha)]}
    run = str(write_run(tmp_path / "run.json", data))
    line = one_error_line(capsys, ["prepare", run])
    assert f"SCALEGPT_DATA_ROOT={root} holds 0 file(s) matching 'corpora/stories.txt'" in line
    (root / "corpora").mkdir(parents=True)
    (root / "corpora" / "stories.txt").write_text("something else entirely\n")
    line = one_error_line(capsys, ["prepare", run])
    assert "stories.txt has sha256" in line and f"should have {sha}" in line
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("preset", ["shakespeare", "real-mix"])
def test_corpus_presets_read_the_shared_folder_through_the_data_root(preset: str, shared_data: Path, tmp_path) -> None:
    """conftest.py points SCALEGPT_DATA_ROOT at ../shared/data; resolving checks every file's sha256."""
    from scalegpt.train.data.sources import resolve

    run = tmp_path / "run.yaml"
    run.write_text(f"defaults:\n  model: nano\n  data: {preset}\n")
    downloaded = [s for s in load_config(run).data.sources if s.download]
    assert downloaded
    for src in downloaded:
        files = resolve(src).files
        assert len(files) == len(src.download) and all(shared_data in f.parents for f in files), src.name


# --- curation in the presets ------------------------------------------------------------------------------


def preset_run(tmp_path: Path, data: str) -> Path:
    run = tmp_path / f"{data}.yaml"
    run.write_text(f"defaults:\n  model: nano\n  data: {data}\ntrain:\n  max_steps: 100\n  micro_batch: 12\n")
    return run


def test_gpt3_preset_declares_the_papers_curation_and_stops_at_its_placeholder(tmp_path: Path, capsys) -> None:
    run = preset_run(tmp_path, "gpt3")
    cfg = load_config(run)
    names = [s.name for s in cfg.data.sources]
    assert names == ["webtext2", "books1", "books2", "wikipedia", "common_crawl"]  # ranked for dedup: crawl last
    weights = {s.name: s.weight for s in cfg.data.sources}  # Table 2.2, by name whatever the order
    assert weights == {"common_crawl": 0.60, "webtext2": 0.22, "books1": 0.08, "books2": 0.08, "wikipedia": 0.03}
    crawl = cfg.data.sources[-1].curation.quality
    assert crawl.positives == ["webtext2", "books1", "books2", "wikipedia"]  # Appendix A
    assert crawl.negatives == [] and crawl.keep == "pareto" and crawl.alpha == 9.0  # against the raw crawl itself
    assert not any(s.curation.quality.positives or s.curation.quality.classifier for s in cfg.data.sources[:-1])
    dedups = [s.curation.dedup for s in cfg.data.sources]
    assert all(d.within for d in dedups) and [d.against for d in dedups] == [[], [], [], [], ["webtext2"]]
    dedup.check_against(dedups, names)  # every source named in against is deduplicated alike
    for i, s in enumerate(cfg.data.sources):  # the checks prepare runs once the paths resolve
        key = f"data.sources.{i}.curation"
        assert decontaminate.check(s.curation.decontaminate, f"{key}.decontaminate") == list(TASKS), s.name
        quality.check(s.curation.quality, f"{key}.quality", cfg.data, s.name)
        assert dedup.check(s.curation.dedup, f"{key}.dedup", names, i), s.name
    line = one_error_line(capsys, ["prepare", str(run), "model.vocab_size=50257", f"data.dir={tmp_path / 'p'}"])
    assert "source 'webtext2': path '/path/to/webtext2/*.jsonl' matches no files" in line
    assert not (tmp_path / "p").exists()


def near_copy(doc: str, rng: random.Random) -> str:
    """doc as another site carries it: one word in 40 changed and a boilerplate line added (a Jaccard of
    about 0.8 on 3-word shingles, well above dedup's threshold)."""
    words = doc.split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // 40)):
        words[i] = "edited"
    return " ".join(words) + "\nShare this article with your friends."


def check_dedup_row(row: dict, received: list[str]) -> None:
    """A dedup row against a second count: what the step received, and its drops adding up to its kept."""
    assert row["documents"] == len(received) and row["bytes"] == sum(len(d.encode()) for d in received)
    dropped = row["dropped_exact"] + row["dropped_fuzzy"] + sum(row["dropped_against"].values())
    assert row["kept"] == row["documents"] - dropped


def test_gpt3_preset_on_stand_ins_filters_dedups_and_decontaminates_as_declared(tmp_path: Path, capsys) -> None:
    """The preset's curation run as declared, its placeholder paths pointed at small generated stand-ins,
    with near-copies of WebText2 documents planted in the crawl: the crawl's copies go, WebText2's stay."""
    planted = queries(TASKS["2D+"], 1000, 1234)[0].line  # a test query of `scalegpt eval`'s default seed
    paragraphs = list(builtin.generate("prose", 0.03, seed=1))
    webtext = ["\n\n".join(paragraphs[i : i + 6]) for i in range(0, len(paragraphs), 6)]  # web pages
    webtext[0] = f"{paragraphs[0]} {planted} {paragraphs[0]}"
    webtext.append(webtext[10].replace("\n\n", "\n"))  # the same words again: an exact duplicate within
    rng = random.Random(3)
    copied = webtext[1:9]
    copies = [near_copy(d, rng) for d in copied]
    crawl = [*builtin.generate("prose", 0.02, seed=5), *builtin.generate("junk", 0.06, seed=6), *copies]
    random.Random(0).shuffle(crawl)
    stand_ins = {
        "webtext2": webtext,
        "books1": list(builtin.generate("prose", 0.03, seed=2)),
        "books2": list(builtin.generate("prose", 0.03, seed=3)),
        "wikipedia": list(builtin.generate("prose", 0.03, seed=4)),
        "common_crawl": crawl,
    }
    paths = []
    for i, (name, docs) in enumerate(stand_ins.items()):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths.append(f"data.sources.{i}.path={tmp_path / f'{name}.jsonl'}")
    # A classifier trained on these few pages scores prose about 0.5-0.8, where pareto(9) keeps one page in
    # ten or fewer: the copies would all go before dedup sees them. A threshold lets prose through to it.
    rule = ["data.sources.4.curation.quality.keep=threshold", "data.sources.4.curation.quality.threshold=0.5"]
    data = tmp_path / "p"
    run = preset_run(tmp_path, "gpt3")
    assert main(["prepare", str(run), *paths, *rule, "model.vocab_size=50257", f"data.dir={data}"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((data / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["sources"]}
    assert list(entries) == list(stand_ins)
    decoded = {name: decoded_documents(data, e["name"]) for name, e in entries.items()}
    for name, e in entries.items():  # every source's rows chain, and the last equals its token file
        assert e["settings"]["curation"]["decontaminate"]["tasks"] == list(TASKS), name
        rows = e["curation"]
        received = stand_ins[name]
        if name == "common_crawl":
            q = rows["quality"]
            assert q["documents"] == len(crawl) and q["kept"] == q["documents"] - q["dropped"] > 0
            assert rows["dedup"]["documents"] == q["kept"] and rows["dedup"]["bytes"] == q["bytes_kept"]
        else:
            assert "quality" not in rows, name
            check_dedup_row(rows["dedup"], received)
        d, c = rows["dedup"], rows["decontaminate"]
        dropped = d["dropped_exact"] + d["dropped_fuzzy"] + sum(d["dropped_against"].values())
        assert d["kept"] == d["documents"] - dropped and list(d["dropped_against"]) == (
            ["webtext2"] if name == "common_crawl" else []
        ), name
        assert c["documents"] == d["kept"] and c["bytes"] == d["bytes_kept"], name
        assert c["pieces"] == len(decoded[name]) == e["documents"], name
        assert f"  {name}: deduplicated: {d['kept']:,} of {d['documents']:,} documents kept" in out, name

    saved = json.loads((data / "curation" / "quality-common_crawl.json").read_text())
    positives = ["webtext2", "books1", "books2", "wikipedia"]
    assert saved["training"]["sources"] == {"positives": positives, "negatives": ["common_crawl"]}
    assert entries["common_crawl"]["curation"]["quality"]["rule"] == {"keep": "threshold", "threshold": 0.5}
    kept_crawl = set(decoded["common_crawl"])
    assert kept_crawl <= set(crawl) and not kept_crawl & set(copies)  # no planted copy reaches the tokens
    assert set(copied) <= set(decoded["webtext2"])  # WebText2 keeps its own copy
    # the crawl's copies that passed the quality filter are the ones dropped against webtext2, each
    # named with the webtext2 document it copies
    against = entries["common_crawl"]["curation"]["dedup"]["dropped_against"]["webtext2"]
    samples = data / entries["common_crawl"]["curation"]["dedup"]["samples"]
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    by_webtext = [r for r in records if r["reason"] == "against:webtext2"]
    assert 1 <= against == len(by_webtext) <= len(copies)
    for r in by_webtext:
        (i,) = [i for i, c in enumerate(copies) if c.startswith(r["excerpt"])]
        assert r["kept"]["source"] == "webtext2" and copied[i].startswith(r["kept"]["excerpt"])
        assert r["jaccard"] >= 0.5

    within = entries["webtext2"]["curation"]["dedup"]
    assert (within["dropped_exact"], within["dropped_fuzzy"]) == (1, 0)
    assert sum(d in (webtext[10], webtext[-1]) for d in decoded["webtext2"]) == 1
    row = entries["webtext2"]["curation"]["decontaminate"]
    assert row["matches"] >= 1 and row["touched"] == 1 and row["documents"] == len(webtext) - 1
    table2_2 = {"common_crawl": 0.60, "webtext2": 0.22, "books1": 0.08, "books2": 0.08, "wikipedia": 0.03}
    mixture = out.split("mixture of 5 sources")[1].splitlines()[2:7]  # the printed weights: Table 2.2's, by name
    printed = {cells[0]: (float(cells[3]), cells[4]) for cells in (line.split() for line in mixture)}
    assert printed == {n: (w, f"{100 * w / sum(table2_2.values()):.2f}%") for n, w in table2_2.items()}
    assert not any(planted in d for d in decoded["webtext2"])
    assert planted in webtext[0] and "  webtext2: decontaminated: " in out


def test_curated_mix_reads_the_web_a_line_a_document(shared_data: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config(preset_run(tmp_path, "curated-mix"))
    names = [s.name for s in cfg.data.sources]
    assert names == ["books", "wiki", "web", "drama", "code"]  # ranked for dedup: the books and wiki keep theirs
    weights = {s.name: s.weight for s in cfg.data.sources}  # real-mix's mixture, whatever the order
    assert weights == {s.name: s.weight for s in load_config(preset_run(tmp_path, "real-mix")).data.sources}
    dedups = [s.curation.dedup for s in cfg.data.sources]
    assert all(d.within for d in dedups) and [d.against for d in dedups] == [[], [], ["books", "wiki"], [], []]
    dedup.check_against(dedups, names)
    assert all(dedup.check(d, f"data.sources.{i}.curation.dedup", names, i) for i, d in enumerate(dedups))
    web_cfg = cfg.data.sources[2]
    web = src_mod.resolve(web_cfg)
    assert web_cfg.text_documents == "line" and [s.name for s in cfg.data.reference_sources] == ["junk"]
    docs = [text for text, _ in src_mod.fragments(web, invalid_utf8="skip", chunk=4096, stats=src_mod.ReadStats())]
    lines = (shared_data / "corpora" / "web_fineweb_edu_sample.txt").read_text().splitlines()
    assert docs == [line for line in lines if line.strip()] and len(docs) > 4000
    bad = [
        ("data.sources.2.text_documents=page", "data.sources.2.text_documents in the command line: must be 'file' or"),
        ("data.reference_sources.0.text_documents=line", "applies to path: sources only (source 'junk')"),
    ]
    for override, message in bad:
        assert message in one_error_line(capsys, ["prepare", str(preset_run(tmp_path, "curated-mix")), override])


@pytest.mark.slow  # tokenizes about 4.5 MB of real text and trains the quality classifier
def test_curated_mix_prepares_offline_and_its_curation_rows_add_up(shared_data: Path, tmp_path: Path, capsys) -> None:
    run = preset_run(tmp_path, "curated-mix")
    data = tmp_path / "p"
    assert main(["prepare", str(run), f"data.dir={data}"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((data / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["sources"]}
    assert list(entries) == ["books", "wiki", "web", "drama", "code"]  # the junk is read, never tokenized
    assert sorted(p.name for p in data.glob("*.bin")) == sorted(f"{n}.bin" for n in entries)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    corpora = shared_data / "corpora"
    inputs = {  # each source's documents, as the files hold them
        "web": [line for line in (corpora / "web_fineweb_edu_sample.txt").read_text().splitlines() if line.strip()],
        "books": [p.read_text() for p in sorted(corpora.glob("books_*.txt"))],
        "wiki": [(corpora / "wiki_wikitext2_valid.txt").read_text()],
        "drama": [(corpora / "drama_tinyshakespeare.txt").read_text()],
        "code": [p.read_text() for p in src_mod.resolve(load_config(run).data.sources[4]).files],
    }
    junk = set(builtin.generate("junk", 2.0))
    for name, e in entries.items():
        docs = decoded_documents(data, e["name"])
        tokens = (data / e["file"]).stat().st_size // itemsize
        assert e["tokens"] == tokens == e["train"]["tokens"] + e["val"]["tokens"], name
        assert e["documents"] == len(docs) and not junk & set(docs), name
        d = e["curation"]["dedup"]
        dropped = d["dropped_exact"] + d["dropped_fuzzy"] + sum(d["dropped_against"].values())
        assert d["kept"] == d["documents"] - dropped and d["bytes_kept"] <= d["bytes"], name
        assert list(d["dropped_against"]) == (["books", "wiki"] if name == "web" else []), name
        assert f"  {name}: deduplicated: {d['kept']:,} of {d['documents']:,} documents kept" in out
        row = e["curation"]["decontaminate"]
        into = docs  # nothing matches, so decontamination receives what it writes: dedup's kept documents
        assert row["documents"] == len(into) == d["kept"] and row["bytes"] == sum(len(x.encode()) for x in into)
        assert row["bytes"] == d["bytes_kept"], name
        assert row["matches"] == 0 and row["pieces"] == len(docs) and row["bytes_kept"] == row["bytes"], name
        assert f"  {name}: decontaminated: 0 matches in 0 of {len(into):,} documents" in out
        if name != "web":  # a few whole files each, none a copy of another
            assert d["documents"] == len(inputs[name]) and d["bytes"] == sum(len(x.encode()) for x in inputs[name])
            assert dropped == 0 and docs == inputs[name] and "quality" not in e["curation"], name

    q = entries["web"]["curation"]["quality"]
    web, kept = inputs["web"], decoded_documents(data, "web")
    d = entries["web"]["curation"]["dedup"]
    assert q["documents"] == len(web) and q["bytes"] == sum(len(x.encode()) for x in web)
    assert q["kept"] == q["documents"] - q["dropped"] == d["documents"] and q["bytes_kept"] == d["bytes"]
    assert 0 < len(kept) == d["kept"] <= q["kept"] < len(web) and set(kept) <= set(web)
    assert sum(q["histogram"]) == len(web) and sum(q["kept_histogram"]) == q["kept"]
    assert len({dedup.normalize(x) for x in kept}) == len(kept)  # no two kept lines with the same words
    samples = [json.loads(line) for line in (data / d["samples"]).read_text().splitlines()]
    assert len(samples) == min(q["kept"] - d["kept"], 100)  # the sample holds the first 100 dropped
    for r in samples:  # each dropped line names the kept one it copies, found where it says
        assert r["kept"]["source"] == ("web" if r["reason"] in ("exact", "fuzzy") else r["reason"][len("against:") :])
        assert r["jaccard"] >= 0.5 and (r["reason"] != "exact" or r["jaccard"] == 1.0)
        if r["kept"]["source"] == "web":
            assert any(x.startswith(r["kept"]["excerpt"]) for x in kept)
    saved = json.loads((data / "curation" / "quality-web.json").read_text())
    assert saved["training"]["sources"] == {"positives": ["books", "wiki"], "negatives": ["junk"]}
    assert saved["metrics"]["auc"] >= 0.95 and f"held-out AUC {saved['metrics']['auc']:.4f}" in out
    assert f"web: quality filter: kept {q['kept']:,} of {len(web):,} documents" in out
    assert f"mixture of 5 sources in {data}" in out
