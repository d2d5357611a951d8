"""kill -9 in the middle of curation: `scalegpt prepare`, run as a real process on two deduplicated sources,
is killed once the first source is finished (its token file marked done in the scratch folder), and the
next run takes that source over instead of deduplicating it again, deduplicates the second against the
first's index the killed run left, and ends with the token files, manifest and dedup indexes of a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_curation_quality import wait_for, write_jsonl

from scalegpt.train.data import builtin
from scalegpt.train.data.prepare.lock import SCRATCH_PREFIX

SCALEGPT = str(Path(sys.executable).with_name("scalegpt"))


def write_config(root: Path, data: Path) -> Path:
    config = root / f"{data.name}.json"
    sources = [
        {"name": "first", "path": str(root / "first.jsonl"), "curation": {"dedup": {"within": True}}},
        {
            "name": "second",
            "path": str(root / "second.jsonl"),
            "curation": {"dedup": {"within": True, "against": ["first"]}},
        },
    ]
    run = {
        "run": {"dir": str(root / "run")},
        "model": {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 16, "vocab_size": 50257},
        "train": {"max_steps": 10, "micro_batch": 4},
        "data": {"dir": str(data), "tokenizer": "gpt2", "val_fraction": 0.01, "num_proc": 2, "sources": sources},
    }
    config.write_text(json.dumps(run))
    return config


def snapshot(data: Path) -> dict[str, bytes]:
    """Every file prepare leaves in data.dir, by its path there."""
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


def index_files(data: Path) -> dict[str, tuple[int, int]]:
    """The first source's dedup index files, each by (inode, mtime): a rewrite changes them."""
    found = sorted((data / "curation").glob("first*.dedup/*"))
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in found}


@pytest.mark.slow  # three real prepares of about 3 MB, one killed
def test_kill_9_after_the_first_deduplicated_source_resumes_without_deduplicating_it_again(tmp_path: Path) -> None:
    first = list(builtin.generate("prose", 0.3, seed=1))
    first += [d.upper() for d in first[:5]]  # the same words: exact copies within
    second = list(builtin.generate("prose", 3.0, seed=2))  # long enough to be killed in the middle of
    second += first[10:20]  # copies of the first source's documents (and prose alike them): dropped against it
    write_jsonl(tmp_path / "first.jsonl", first)
    write_jsonl(tmp_path / "second.jsonl", second)

    killed = tmp_path / "killed"
    config = write_config(tmp_path, killed)
    proc = psutil.Popen(
        [SCALEGPT, "prepare", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    marker = f"{SCRATCH_PREFIX}*/first.bin.entry.json"
    wait_for(lambda: any(killed.glob(marker)), "the first source's finished marker")
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its tokenizing workers, as when a node is lost
    proc.wait(timeout=60)
    assert not (killed / "manifest.json").exists()  # killed before the end
    assert not any(killed.glob(f"{SCRATCH_PREFIX}*/second.bin.entry.json"))
    left = index_files(killed)
    assert "meta.json" in left  # the first source's index is in place for the second to read

    out = subprocess.run([SCALEGPT, "prepare", str(config)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "first: taking over the tokens an interrupted run had finished" in out.stdout
    assert "first: deduplicated" not in out.stdout and "second: deduplicated" in out.stdout
    assert index_files(killed) == left  # the first source's index was read, not made again

    whole = tmp_path / "whole"
    subprocess.run([SCALEGPT, "prepare", str(write_config(tmp_path, whole))], check=True, capture_output=True)
    resumed, uninterrupted = snapshot(killed), snapshot(whole)
    manifest = json.loads(resumed.pop("manifest.json"))
    assert manifest == json.loads(uninterrupted.pop("manifest.json"))
    assert resumed == uninterrupted  # token files, dedup indexes and their dropped samples, byte for byte
    rows = {e["name"]: e["curation"]["dedup"] for e in manifest["sources"]}
    assert rows["first"]["dropped_exact"] == 5  # the upper-cased copies
    assert list(rows["second"]["dropped_against"]) == ["first"] and rows["second"]["dropped_against"]["first"] >= 10
