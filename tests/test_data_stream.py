"""Streaming Hugging Face sources (`streaming: true`, `max_documents`, `max_mb`), read from local dataset
folders that the tests write, loaded the way a hub name is; and `scalegpt prepare` stopped mid-tokenizing
by kill -9, SIGTERM and Ctrl-C, as real processes."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalegpt.launch.cli import main
from scalegpt.train.data import builtin
from scalegpt.train.data.tokenizer import save_tokenizer, train_bpe

from e2e import like_a_terminal
from helpers import write_config

SCALEGPT = Path(sys.executable).with_name("scalegpt")


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [builtin.prose_document(rng) for _ in range(n)]


def manifest_entry(data_dir: Path, name: str) -> dict:
    return next(e for e in json.loads((data_dir / "manifest.json").read_text())["sources"] if e["name"] == name)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_bpe(documents(300), 512), path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 400 documents as a JSONL dataset folder and as a Parquet one (two files each)."""
    root = tmp_path_factory.mktemp("hf")
    docs = documents(400, seed=1)
    (root / "jsonl").mkdir()
    (root / "parquet").mkdir()
    for k, part in enumerate((docs[:250], docs[250:])):
        with open(root / "jsonl" / f"train-{k}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(part))
        pq.write_table(pa.table({"text": part}), root / "parquet" / f"train-{k}.parquet", row_group_size=50)
    return {"jsonl": root / "jsonl", "parquet": root / "parquet", "docs": root}


def hf_source(folder: Path, **extra: object) -> dict:
    return {"name": "hub", "hf": str(folder), **extra}


def test_a_streamed_folder_prepares_the_same_tokens_as_one_read_whole(folders, tokenizer_path, tmp_path) -> None:
    base = {"tokenizer": str(tokenizer_path), "num_proc": 1, "val_fraction": 0.05}
    whole = write_config(
        tmp_path / "whole.yaml", {**base, "dir": str(tmp_path / "w"), "sources": [hf_source(folders["jsonl"])]}
    )
    streamed = {**base, "dir": str(tmp_path / "s"), "sources": [hf_source(folders["jsonl"], streaming=True)]}
    assert main(["prepare", str(whole)]) == 0
    assert main(["prepare", str(write_config(tmp_path / "s.yaml", streamed))]) == 0
    assert (tmp_path / "s" / "hub.bin").read_bytes() == (tmp_path / "w" / "hub.bin").read_bytes()
    e = manifest_entry(tmp_path / "s", "hub")
    assert e["documents"] == 400 and e["val"]["documents"] == 20
    assert "max_documents" not in e["settings"]  # unset limits leave the settings (and old manifests) as they were


def test_max_documents_set_on_the_command_line_stops_a_parquet_stream(
    folders, tokenizer_path, tmp_path, capsys
) -> None:
    data = {
        "tokenizer": str(tokenizer_path),
        "num_proc": 2,
        "dir": str(tmp_path / "p"),
        "sources": [hf_source(folders["parquet"], streaming=True)],
    }
    cfg = write_config(tmp_path / "p.yaml", data)
    assert main(["prepare", str(cfg), "data.sources.0.max_documents=120"]) == 0
    full = tmp_path / "full"
    assert main(["prepare", str(cfg), f"data.dir={full}"]) == 0
    e, f = manifest_entry(tmp_path / "p", "hub"), manifest_entry(full, "hub")
    assert e["documents"] == 120 and f["documents"] == 400 and e["settings"]["max_documents"] == 120
    eot = json.loads((full / "manifest.json").read_text())["eot_id"]
    ids, full_ids = np.fromfile(tmp_path / "p" / "hub.bin", np.uint16), np.fromfile(full / "hub.bin", np.uint16)
    assert np.array_equal(ids, full_ids[: np.flatnonzero(full_ids == eot)[119] + 1])  # the first 120, in order
    capsys.readouterr()
    assert main(["prepare", str(cfg), "data.sources.0.max_documents=200"]) == 0  # a changed limit re-prepares
    assert manifest_entry(tmp_path / "p", "hub")["documents"] == 200
    assert "preparing 1 of 1" in capsys.readouterr().out


def test_max_mb_stops_after_the_document_that_reaches_it(folders, tokenizer_path, tmp_path) -> None:
    docs = documents(400, seed=1)
    sizes = np.cumsum([len(d.encode()) for d in docs])
    data = {
        "tokenizer": str(tokenizer_path),
        "num_proc": 1,
        "dir": str(tmp_path / "m"),
        "sources": [hf_source(folders["jsonl"], streaming=True, max_mb=0.05)],
    }
    assert main(["prepare", str(write_config(tmp_path / "m.yaml", data))]) == 0
    e = manifest_entry(tmp_path / "m", "hub")
    assert e["documents"] == int(np.searchsorted(sizes, 50_000)) + 1 and e["bytes"] == sizes[e["documents"] - 1]


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ({"path": "x.txt", "streaming": True}, "data.sources.0.streaming"),
        ({"builtin": "prose", "max_documents": 5}, "data.sources.0.max_documents"),
        ({"hf": "x", "max_documents": 0}, "data.sources.0.max_documents in"),
        ({"hf": "x", "max_mb": -1.0}, "must be a positive number of MB"),
    ],
)
def test_limits_and_streaming_are_checked_at_load_time(source: dict, expect: str, tmp_path, capsys) -> None:
    cfg = write_config(tmp_path / "bad.yaml", {"dir": str(tmp_path / "d"), "sources": [{"name": "s", **source}]})
    assert main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalegpt: error: ") and expect in err[0], err
    assert not (tmp_path / "d").exists()


def test_a_streamed_folder_without_the_text_field_names_it(folders, tokenizer_path, tmp_path, capsys) -> None:
    data = {
        "tokenizer": str(tokenizer_path),
        "dir": str(tmp_path / "d"),
        "sources": [hf_source(folders["jsonl"], streaming=True, text_field="body")],
    }
    assert main(["prepare", str(write_config(tmp_path / "c.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalegpt: error: source 'hub'") and "'body'" in err and "text_field" in err
    assert not (tmp_path / "d").exists()


# --- stopping a prepare mid-tokenizing ------------------------------------------------------------------


def poll(condition: Callable[[], bool], what: str, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def tokenizing(data_dir: Path, file: str) -> bool:
    """True once a source's token file is being written in a scratch folder (the workers are running)."""
    return any(p.stat().st_size > 0 for p in data_dir.glob(f".prepare-tmp-*/{file}") if p.exists())


def lock_is_free(data_dir: Path) -> bool:
    lock = data_dir / ".prepare.lock"
    if not lock.exists():
        return True
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True


def start(cfg: Path) -> psutil.Popen:
    # its own session, so a signal to its process group reaches it and its workers the way Ctrl-C does
    return psutil.Popen(
        [str(SCALEGPT), "prepare", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=like_a_terminal,
    )


@pytest.fixture
def big(tokenizer_path: Path, tmp_path: Path) -> Callable[..., Path]:
    """A config whose last source takes seconds to tokenize: long enough to be caught mid-way."""
    (tmp_path / "a.txt").write_text("\n\n".join(documents(200, seed=2)))

    def make(mb: float = 30.0, with_small: bool = False) -> Path:
        sources = [{"name": "a", "path": str(tmp_path / "a.txt")}] if with_small else []
        sources.append({"name": "b", "builtin": "prose", "builtin_mb": mb})
        data = {"tokenizer": str(tokenizer_path), "num_proc": 2, "dir": str(tmp_path / "d"), "sources": sources}
        return write_config(tmp_path / "big.yaml", data)

    return make


@pytest.mark.slow  # a real prepare, killed
def test_kill_9_mid_tokenizing_leaves_nothing_complete_and_the_rerun_redoes_only_the_rest(big, tmp_path) -> None:
    d = tmp_path / "d"
    proc = start(big(with_small=True))
    poll(lambda: tokenizing(d, "b.bin"), "source b's token file in the scratch folder")
    workers = proc.children()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    poll(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), "the workers to die")
    assert lock_is_free(d)
    assert not (d / "manifest.json").exists() and not list(d.glob("*.bin"))  # nothing looks complete
    out = subprocess.run([str(SCALEGPT), "prepare", str(big(mb=0.5, with_small=True))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "a: taking over the tokens an interrupted run had finished" in out.stdout
    e = manifest_entry(d, "a")
    assert (d / "a.bin").stat().st_size == 2 * e["tokens"] and manifest_entry(d, "b")["tokens"] > 0
    assert not list(d.glob(".prepare-tmp-*")) and not (d / ".prepare.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_prepare_leaves_no_worker_lock_or_scratch(sig: signal.Signals, big, tmp_path) -> None:
    d = tmp_path / "d"
    proc = start(big())
    poll(lambda: tokenizing(d, "b.bin"), "source b's token file in the scratch folder")
    workers = proc.children()
    assert len(workers) == 2
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0] == ("scalegpt: interrupted" if sig == signal.SIGINT else lines[0]) and lines[0].startswith(
        "scalegpt: "
    )
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert not list(d.glob(".prepare-tmp-*")) and not (d / ".prepare.lock").exists()
    assert not d.exists() or not any(d.iterdir())
