"""`scalegpt prepare`: every kind of source, the token files and manifest, incremental re-runs, and the
data presets in configs/data/."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalegpt.launch.cli import main
from scalegpt.train.config.loading import load_config
from scalegpt.train.data import builtin
from scalegpt.train.data.mixture import Mixture
from scalegpt.train.data.prepare import ROW_CHARS, prepare
from scalegpt.train.data.sources import resolve
from scalegpt.train.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash, train_bpe

from helpers import decoded_documents, story, write_config


def run_prepare(cfg_path: Path, *overrides: str) -> list[str]:
    out: list[str] = []
    prepare(load_config(cfg_path, list(overrides)), echo=out.append)
    return out


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token BPE trained once, so most tests skip training (data.tokenizer=<path>)."""
    tok = train_bpe([story(i, 2) for i in range(300)] + list(builtin.generate("arithmetic", 0.05)), 512)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(tok, path)
    return path


def test_builtin_mixture_bpe_end_to_end(tmp_path: Path) -> None:
    data = {
        "dir": str(tmp_path / "prep"),
        "val_fraction": 0.05,
        "num_proc": 2,
        "sources": [
            {"name": n, "builtin": n, "builtin_mb": 0.06, "weight": w}
            for n, w in (("arithmetic", 0.4), ("scramble", 0.3), ("prose", 0.3))
        ],
    }
    cfg = write_config(tmp_path / "run.yaml", data)
    out = run_prepare(cfg)
    prep = tmp_path / "prep"
    m = json.loads((prep / "manifest.json").read_text())
    tok = load_tokenizer(prep / "tokenizer.json")
    assert m["tokenizer_hash"] == tokenizer_hash(tok) and m["vocab_size"] == 512 and m["dtype"] == "uint16"
    assert m["tokenizer_recipe"] == {"kind": "bpe", "vocab_size": 512, "sample_mb": 8.0}
    assert [s["name"] for s in m["sources"]] == ["arithmetic", "scramble", "prose"]
    for s in m["sources"]:
        docs = list(builtin.generate(s["name"], 0.06))
        assert decoded_documents(prep, s["name"]) == docs  # packing: each document, then EOT
        assert (prep / s["file"]).stat().st_size == 2 * s["tokens"]
        assert s["documents"] == len(docs) and s["bytes"] == sum(len(d) for d in docs)
        assert s["split"] == "documents" and s["val"]["documents"] == round(0.05 * len(docs))
        assert s["train"]["tokens"] + s["val"]["tokens"] == s["tokens"]
        assert s["val"]["bytes"] == sum(len(d) for d in docs[-s["val"]["documents"] :])
        assert len(s["fingerprint"]) == 64
    assert any("trained a byte-level BPE of 512 tokens" in line for line in out)
    assert any("epochs" in line for line in out) and any("planned run: 40 samples" in line for line in out)
    assert sorted(p.name for p in prep.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "arithmetic.bin", "scramble.bin", "prose.bin"]
    )

    before = {p.name: p.stat().st_mtime_ns for p in prep.iterdir()}
    out = run_prepare(cfg)
    assert any(line.startswith("nothing to do") for line in out)
    assert {p.name: p.stat().st_mtime_ns for p in prep.iterdir()} == before

    # a changed builtin size re-prepares that source alone, with the same tokenizer
    data["sources"][1]["builtin_mb"] = 0.07
    out = run_prepare(write_config(tmp_path / "run.yaml", data))
    assert any("preparing 1 of 3 sources" in line for line in out)
    after = {p.name: p.stat().st_mtime_ns for p in prep.iterdir()}
    assert after["arithmetic.bin"] == before["arithmetic.bin"] and after["prose.bin"] == before["prose.bin"]
    assert after["scramble.bin"] != before["scramble.bin"]
    assert after["tokenizer.json"] == before["tokenizer.json"]
    assert decoded_documents(prep, "scramble") == list(builtin.generate("scramble", 0.07))


def test_local_formats_each_document_once(tmp_path: Path, tokenizer_path: Path) -> None:
    docs = [story(i, 1) for i in range(12)]
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i, d in enumerate(docs[:3]):
        (src / "txt" / f"{i}.txt").write_text(d)
    (src / "txt" / ".hidden.txt").write_text("never read")
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[3:5])) + "\n\n")
    (src / "b.json").write_text(json.dumps([{"body": d} for d in docs[5:7]]))
    pq.write_table(pa.table({"text": docs[7:9] + [None]}), src / "c.parquet")
    with gzip.open(src / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in docs[9:11]))
    hf = src / "hf"
    hf.mkdir()
    (hf / "train.jsonl").write_text(json.dumps({"text": docs[11]}) + "\n" + json.dumps({"text": docs[0]}) + "\n")
    sources = [
        {"name": "folder", "path": str(src / "txt")},
        {"name": "jsonl", "path": str(src / "a.jsonl")},
        {"name": "json", "path": str(src / "b.json"), "text_field": "body"},
        {"name": "parquet", "path": str(src / "c.parquet")},
        {"name": "gz", "path": str(src / "*.gz")},
        {"name": "hf_local", "hf": str(hf)},
    ]
    data = {
        "dir": str(tmp_path / "prep"),
        "tokenizer": str(tokenizer_path),
        "num_proc": 1,
        "sources": sources,
    }
    run_prepare(write_config(tmp_path / "run.yaml", data))
    prep = tmp_path / "prep"
    assert decoded_documents(prep, "folder") == docs[:3]
    assert decoded_documents(prep, "jsonl") == docs[3:5]
    assert decoded_documents(prep, "json") == docs[5:7]
    assert decoded_documents(prep, "parquet") == docs[7:9]
    assert decoded_documents(prep, "gz") == docs[9:11]
    assert decoded_documents(prep, "hf_local") == [docs[11], docs[0]]
    m = json.loads((prep / "manifest.json").read_text())
    assert {s["name"]: s["kind"] for s in m["sources"]}["hf_local"] == "hf"


def test_one_long_document_is_chunked_identically_and_split_by_tokens(tmp_path: Path, tokenizer_path: Path) -> None:
    text = "\n".join(story(i, 4) for i in range(250))  # one file = one document, several rows long
    assert len(text) > 3 * ROW_CHARS
    (tmp_path / "book.txt").write_text(text)
    data = {
        "dir": str(tmp_path / "prep"),
        "tokenizer": str(tokenizer_path),
        "val_fraction": 0.1,
        "num_proc": 2,
        "sources": [{"name": "book", "path": str(tmp_path / "book.txt")}],
    }
    run_prepare(write_config(tmp_path / "run.yaml", data))
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    ids = np.fromfile(tmp_path / "prep" / "book.bin", dtype=np.uint16)
    tok = load_tokenizer(tokenizer_path)
    assert ids.tolist() == tok.encode(text).ids + [m["eot_id"]]  # rows of one document == the whole
    (s,) = m["sources"]
    assert s["split"] == "tokens" and s["documents"] == 1
    assert s["val"]["tokens"] == round(0.1 * s["tokens"])
    val_text = tok.decode(ids[s["train"]["tokens"] :].tolist())
    assert text.endswith(val_text) and s["val"]["bytes"] == len(val_text.encode())
    assert s["train"]["bytes"] + s["val"]["bytes"] == len(text.encode())


def test_stdlib_glob_reads_the_running_pythons_library(tmp_path: Path, tokenizer_path: Path) -> None:
    data = {
        "dir": str(tmp_path / "prep"),
        "tokenizer": str(tokenizer_path),
        "num_proc": 1,
        "sources": [{"name": "code", "path": "stdlib:json/*.py"}],
    }
    run_prepare(write_config(tmp_path / "run.yaml", data))
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py"))
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert m["sources"][0]["documents"] == len(files)
    assert decoded_documents(tmp_path / "prep", "code") == [f.read_text() for f in files]


def test_changes_reprepare_only_what_they_touch(tmp_path: Path, tokenizer_path: Path) -> None:
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(story(ord(name), 30))
    prep = tmp_path / "prep"
    data = {
        "dir": str(prep),
        "tokenizer": str(tokenizer_path),
        "num_proc": 1,
        "sources": [{"name": n, "path": str(tmp_path / f"{n}.txt"), "weight": 1.0} for n in "abc"],
    }
    cfg = write_config(tmp_path / "run.yaml", data)
    run_prepare(cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in prep.iterdir()}

    (tmp_path / "b.txt").write_text(story(99, 30))  # one changed file
    out = run_prepare(cfg)
    assert any("preparing 1 of 3 sources" in line for line in out)
    now = {p.name: p.stat().st_mtime_ns for p in prep.iterdir()}
    assert now["a.bin"] == mtimes["a.bin"] and now["c.bin"] == mtimes["c.bin"] and now["b.bin"] != mtimes["b.bin"]
    assert decoded_documents(prep, "b") == [story(99, 30)]

    data["sources"][0]["weight"] = 3.0  # weights: manifest updated, nothing tokenized
    data["sources"].pop()  # and a removed source loses its token file
    out = run_prepare(write_config(cfg, data))
    assert any(line.startswith("nothing to do") for line in out)
    assert any("removed source 'c'" in line for line in out)
    m = json.loads((prep / "manifest.json").read_text())
    assert [(s["name"], s["weight"]) for s in m["sources"]] == [("a", 3.0), ("b", 1.0)]
    assert not (prep / "c.bin").exists()
    assert Mixture(prep, 16, 0).weights.tolist() == [0.75, 0.25]

    other = train_bpe([story(i, 2) for i in range(200, 400)], 512)  # a new tokenizer re-makes everything
    save_tokenizer(other, tmp_path / "other.json")
    out = run_prepare(cfg, f"data.tokenizer={tmp_path / 'other.json'}")
    assert any("the tokenizer changed" in line for line in out) and any("preparing 2 of 2" in line for line in out)
    assert json.loads((prep / "manifest.json").read_text())["tokenizer_hash"] == tokenizer_hash(other)
    assert tokenizer_hash(load_tokenizer(prep / "tokenizer.json")) == tokenizer_hash(other)
    assert decoded_documents(prep, "a") == [story(ord("a"), 30)]


def test_invalid_utf8_skip_counts_and_drops_bad_lines(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"good line one\nbad \xff\xfe line\ngood line three\n" * 40)
    data = {
        "dir": str(tmp_path / "prep"),
        "tokenizer": str(tokenizer_path),
        "invalid_utf8": "skip",
        "val_fraction": 0.0,
        "num_proc": 1,
        "sources": [{"name": "bad", "path": str(tmp_path / "bad.txt")}],
    }
    out = run_prepare(write_config(tmp_path / "run.yaml", data))
    assert any("skipped 40 line(s) of invalid UTF-8" in line and "bad.txt:2" in line for line in out)
    m = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert m["sources"][0]["invalid_utf8_lines_skipped"] == 40
    assert decoded_documents(tmp_path / "prep", "bad") == ["good line one\ngood line three\n" * 40]


@pytest.fixture
def preset_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run file in a user's own folder (tmp_path, also the working directory) that composes one of the
    packaged data presets with the nano model; their corpora come from SCALEGPT_DATA_ROOT (conftest.py)."""
    monkeypatch.chdir(tmp_path)

    def make(data: str) -> Path:
        run = tmp_path / f"{data}.yaml"
        run.write_text(f"defaults:\n  model: nano\n  data: {data}\ntrain:\n  max_steps: 100\n  micro_batch: 12\n")
        return run

    return make


def test_shakespeare_preset_holds_out_the_last_tenth(preset_run, shared_data: Path, tmp_path: Path, capsys) -> None:
    run = preset_run("shakespeare")
    assert main(["prepare", str(run), f"data.dir={tmp_path / 'p'}", "data.tokenizer_sample_mb=0.3"]) == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    (s,) = m["sources"]
    assert s["split"] == "tokens" and s["bytes"] == 1_115_394
    assert abs(s["val"]["tokens"] / s["tokens"] - 0.1) < 1e-4
    assert "shakespeare" in capsys.readouterr().out


def test_real_mix_preset_resolves_every_domain(preset_run, shared_data: Path) -> None:
    """Every corpus of the data root's corpora/ plus stdlib code, web heaviest (tokenizing all 5 MB is the
    benchmark's job, bench/data.py)."""
    cfg = load_config(preset_run("real-mix"))
    found = {s.name: resolve(s) for s in cfg.data.sources}
    weights = {s.name: s.weight for s in cfg.data.sources}
    assert max(weights, key=weights.get) == "web" and weights["books"] > weights["wiki"] > weights["drama"]
    files = {f.name for src in found.values() for f in src.files}
    assert {p.name for p in (shared_data / "corpora").glob("*.txt")} <= files
    assert any(f.suffix == ".py" for f in found["code"].files)


def test_gpt3_preset_needs_user_paths(preset_run, tmp_path: Path, capsys) -> None:
    run = preset_run("gpt3")
    code = main(["prepare", str(run), f"data.dir={tmp_path / 'p'}", "model.vocab_size=50257"])
    err = capsys.readouterr().err
    assert code == 2 and "source 'webtext2'" in err and "/path/to/webtext2/" in err
    assert not (tmp_path / "p").exists()


def test_a_spawned_worker_loads_the_tokenizer_itself(tokenizer_path: Path) -> None:
    """Forked workers inherit the tokenizer; a spawned one (macOS, Windows) reads the scratch copy."""
    from scalegpt.train.data.prepare import workers

    out = workers.encode_rows(
        [(["hello world", "\nagain"], [False, True])], "not-inherited", str(tokenizer_path), 0, "uint16"
    )
    tok = load_tokenizer(tokenizer_path)
    assert out.ids.tolist() == tok.encode("hello world\nagain").ids + [0]
    assert out.nbytes == 17 and out.doc_ends.tolist() == [len(out.ids)] and out.doc_bytes.tolist() == [17]
    workers.WORKER_TOKENIZERS.pop("not-inherited")
