"""Presets as a user meets them: found by name from any directory, GPT-2's tokenizer by name, corpora
downloaded and checked against their sha256, and the SCALEGPT_DATA_ROOT mirror that keeps CI offline."""

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
from scalegpt.train.data.tokenizer import PACKAGED_TOKENIZERS, load_tokenizer
from scalegpt.train.errors import UserError

from conftest import CONFIGS

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
