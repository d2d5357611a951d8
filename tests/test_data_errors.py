"""Every bad input of `scalegpt prepare` (issue 3, point 7): one line `scalegpt: error: ...`, exit 2, nothing
half-written left behind, and nothing that existed lost."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.train.data.tokenizer import save_tokenizer, train_bpe

from helpers import story, write_config


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below folder (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("scalegpt: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A prepared data folder (to check nothing is lost), its config, a tokenizer and input files."""
    root = tmp_path_factory.mktemp("errors")
    (root / "a.txt").write_text(story(1, 20))
    (root / "b.txt").write_text(story(2, 20))
    (root / "empty.txt").write_text("")
    (root / "empties").mkdir()
    for i in range(3):
        (root / "empties" / f"{i}.txt").write_text("")
    (root / "blank.jsonl").write_text('\n{"text": null}\n\n')
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") + b"fine line\n" * 50)
    (root / "notjson.jsonl").write_text('{"text": "ok"}\n{text: nope}\n')
    (root / "nofield.jsonl").write_text('{"body": "some text"}\n')
    (root / "tiny.txt").write_text("hi")
    tok = train_bpe([story(i, 20) for i in range(10)], 512)
    save_tokenizer(tok, root / "tok.json")
    other = train_bpe([story(i, 20) for i in range(10, 20)], 512)
    save_tokenizer(other, root / "other.json")
    data = {
        "dir": str(root / "prep"),
        "tokenizer": str(root / "tok.json"),
        "num_proc": 1,
        "sources": [
            {"name": "a", "path": str(root / "a.txt"), "weight": 0.5},
            {"name": "b", "path": str(root / "b.txt"), "weight": 0.5},
        ],
    }
    cfg = write_config(root / "good.yaml", data)
    assert main(["prepare", str(cfg)]) == 0
    return {"root": root, "data": data, "cfg": cfg}


def add_source(**source: object) -> Callable[[dict, Path], None]:
    def mutate(data: dict, root: Path) -> None:
        data["sources"].append({"name": "new", **{k: str(v).format(root=root) for k, v in source.items()}})

    return mutate


def set_(key: str, value: object) -> Callable[[dict, Path], None]:
    def mutate(data: dict, root: Path) -> None:
        target = data
        *path, last = key.split(".")
        for k in path:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = str(value).format(root=root) if isinstance(value, str) else value

    return mutate


def both(*mutations: Callable[[dict, Path], None]) -> Callable[[dict, Path], None]:
    def mutate(data: dict, root: Path) -> None:
        for m in mutations:
            m(data, root)

    return mutate


BAD_DATA = {
    "missing path": (add_source(path="{root}/no/such/file.txt"), ["source 'new'", "does not exist"]),
    "glob matches nothing": (add_source(path="{root}/nothing-*.txt"), ["matches no files"]),
    "empty stdlib glob": (add_source(path="stdlib:no_such_package_xyz/*.py"), ["matches no files", "under"]),
    "empty file": (add_source(path="{root}/empty.txt"), ["source 'new'", "is empty"]),
    "folder of empty files": (add_source(path="{root}/empties"), ["is empty", "3 file(s)"]),
    "jsonl without text": (add_source(path="{root}/blank.jsonl"), ["is empty"]),
    "invalid UTF-8 (error)": (
        both(add_source(path="{root}/latin1.txt"), set_("invalid_utf8", "error")),
        ["latin1.txt:1", "invalid UTF-8", "data.invalid_utf8=skip"],
    ),
    "not JSON": (add_source(path="{root}/notjson.jsonl"), ["notjson.jsonl:2", "not valid JSON"]),
    "missing text field": (
        add_source(path="{root}/nofield.jsonl"),
        ["nofield.jsonl:1", "no 'text' field", "body"],
    ),
    "unknown builtin": (add_source(builtin="poetry"), ["unknown builtin corpus 'poetry'"]),
    "zero weight": (set_("sources.0.weight", 0), ["data.sources.0.weight", "positive"]),
    "negative weight": (set_("sources.1.weight", -0.5), ["data.sources.1.weight", "positive"]),
    "non-numeric weight": (set_("sources.0.weight", "heavy"), ["weight", "heavy", "could not be converted"]),
    "all weights zero": (
        both(set_("sources.0.weight", 0), set_("sources.1.weight", 0)),
        ["weight", "positive"],
    ),
    "duplicate names": (set_("sources.1.name", "a"), ["duplicate source name 'a'"]),
    "too small for one window": (
        add_source(path="{root}/tiny.txt"),
        ["source 'new'", "fewer than one window"],
    ),
    "tokenizer of another size": (
        set_("tokenizer", "{root}/tok.json"),
        ["has 512 tokens", "model.vocab_size is 600"],
    ),
    "missing tokenizer": (set_("tokenizer", "{root}/nope.json"), ["nope.json does not exist"]),
    "no sources": (set_("sources", []), ["data.sources is empty"]),
}
MODEL_OVERRIDES = {"tokenizer of another size": {"vocab_size": 600}}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_input_keeps_existing_data(case: str, world: dict, tmp_path: Path, capsys) -> None:
    mutate, needles = BAD_DATA[case]
    root, prep = world["root"], world["root"] / "prep"
    before = snapshot(prep)
    data = copy.deepcopy(world["data"])
    mutate(data, root)
    cfg = write_config(tmp_path / "bad.yaml", data, MODEL_OVERRIDES.get(case))
    line = one_error_line(capsys, ["prepare", str(cfg)])
    for needle in needles:
        assert needle in line, line
    assert snapshot(prep) == before  # nothing lost, nothing half-written (no temporaries either)


@pytest.mark.parametrize("case", ["missing path", "invalid UTF-8 (error)", "too small for one window"])
def test_bad_input_leaves_no_new_folder(case: str, world: dict, tmp_path: Path, capsys) -> None:
    mutate, _ = BAD_DATA[case]
    data = copy.deepcopy(world["data"])
    mutate(data, world["root"])
    data["dir"] = str(tmp_path / "fresh" / "deeper" / "prep")
    one_error_line(capsys, ["prepare", str(write_config(tmp_path / "bad.yaml", data))])
    assert not (tmp_path / "fresh").exists()


def test_vocab_too_large_for_the_token_dtype(world: dict, tmp_path: Path, capsys) -> None:
    data = copy.deepcopy(world["data"])
    data["tokenizer"] = "bpe"
    cfg = write_config(tmp_path / "big.yaml", data, {"vocab_size": 2**32 + 1})
    line = one_error_line(capsys, ["prepare", str(cfg)])
    assert "too large for the token files' largest dtype" in line


def test_gpt2_tokenizer_with_a_small_model(world: dict, tmp_path: Path, capsys) -> None:
    data = copy.deepcopy(world["data"])
    data["tokenizer"] = "gpt2"
    line = one_error_line(capsys, ["prepare", str(write_config(tmp_path / "g.yaml", data))])
    assert "has 50257 tokens but model.vocab_size is 512" in line and "model.vocab_size=50257" in line


def test_manifest_made_by_a_different_tokenizer(world: dict, tmp_path: Path, capsys) -> None:
    prep = tmp_path / "prep"
    shutil.copytree(world["root"] / "prep", prep)
    shutil.copy(world["root"] / "other.json", prep / "tokenizer.json")  # someone swapped the tokenizer
    data = {**copy.deepcopy(world["data"]), "dir": str(prep)}
    before = snapshot(prep)
    line = one_error_line(capsys, ["prepare", str(write_config(tmp_path / "run.yaml", data))])
    assert "manifest.json was made by a different tokenizer" in line and "restore" in line
    assert snapshot(prep) == before

    (prep / "manifest.json").write_text("{ truncated")
    line = one_error_line(capsys, ["prepare", str(write_config(tmp_path / "run.yaml", data))])
    assert "manifest.json is not valid JSON" in line


def test_invalid_utf8_skip_is_reported_not_fatal(world: dict, tmp_path: Path, capsys) -> None:
    data = copy.deepcopy(world["data"])
    add_source(path="{root}/latin1.txt")(data, world["root"])
    data["dir"] = str(tmp_path / "prep")
    assert main(["prepare", str(write_config(tmp_path / "run.yaml", data))]) == 0
    assert "skipped 1 line(s) of invalid UTF-8 (first at" in capsys.readouterr().out


def test_unreachable_hub_names_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The Hub cut off (offline mode: the same failure as no network, without waiting on retries)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = {"dir": str(tmp_path / "prep"), "sources": [{"name": "web", "hf": "nobody/no-such-dataset-xyz"}]}
    line = one_error_line(capsys, ["prepare", str(write_config(tmp_path / "hf.yaml", data))])
    assert line.startswith("scalegpt: error: source 'web': cannot load Hugging Face dataset")
    assert "nobody/no-such-dataset-xyz" in line and "local dataset folder" in line
    assert not (tmp_path / "prep").exists()


def test_the_installed_command_reports_errors_the_same_way(tmp_path: Path) -> None:
    """The real entry point in a fresh process: exit code 2 and one line on stderr."""
    data = {"dir": str(tmp_path / "prep"), "sources": [{"name": "x", "path": str(tmp_path / "missing.txt")}]}
    cfg = write_config(tmp_path / "run.yaml", data)
    scalegpt = Path(sys.executable).with_name("scalegpt")
    out = subprocess.run([str(scalegpt), "prepare", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("scalegpt: error: source 'x': path") and "does not exist" in out.stderr
    assert not (tmp_path / "prep").exists()


def test_a_second_concurrent_prepare_is_refused(world: dict, tmp_path: Path, capsys) -> None:
    import fcntl

    data = {**copy.deepcopy(world["data"]), "dir": str(tmp_path / "prep")}
    (tmp_path / "prep").mkdir()
    with open(tmp_path / "prep" / ".prepare.lock", "a") as held:  # another prepare, mid-write
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_error_line(capsys, ["prepare", str(write_config(tmp_path / "run.yaml", data))])
    assert "another `scalegpt prepare` is writing" in line
    assert [p.name for p in (tmp_path / "prep").iterdir()] == [".prepare.lock"]  # the holder's, untouched


def test_data_dir_that_is_a_file(world: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "prep").write_text("not a folder")
    data = {**copy.deepcopy(world["data"]), "dir": str(tmp_path / "prep")}
    line = one_error_line(capsys, ["prepare", str(write_config(tmp_path / "run.yaml", data))])
    assert "is a file, not a" in line and (tmp_path / "prep").read_text() == "not a folder"
