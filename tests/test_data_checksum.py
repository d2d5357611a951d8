"""Token-file checksums: prepare records them, a run checks them once before it trains and says which
check ran, and a data dir prepared before checksums still trains, saying it is unverified and how to fix
that. (A rewritten file refused by its checksum is a case in test_bad_input.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from scalegpt.train.data import checksum
from scalegpt.train.errors import UserError

from e2e import SMALL_DATA, SMOKE, scalegpt


def test_prepare_records_the_sha256_of_each_token_file_as_written(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    for e in manifest["sources"]:
        data = (prepared / e["file"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest()  # a second computation, from the file on disk
        assert e["sampled_sha256"] == checksum.sampled_sha256(prepared / e["file"])


def test_past_the_size_limit_sampled_blocks_stand_in_and_still_catch_a_rewritten_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    monkeypatch.setattr(checksum, "SAMPLE_BYTES", 512)
    monkeypatch.setattr(checksum, "SAMPLE_BLOCKS", 4)  # 2 KiB of 16 sampled: first, last and two between
    manifest = {"sources": [{"name": "a", "file": "a.bin", **checksum.checksums(f)}]}
    assert "sha256 of each whole file" in checksum.verify(tmp_path, manifest)
    monkeypatch.setattr(checksum, "FULL_HASH_MAX_BYTES", 1024)
    assert "4 sampled blocks" in checksum.verify(tmp_path, manifest)
    with open(f, "r+b") as out:  # inside the first block
        out.seek(100)
        out.write(b"\x00" * 8)
    with pytest.raises(UserError, match=f"token file {f} does not match"):
        checksum.verify(tmp_path, manifest)


@pytest.mark.slow  # it trains
def test_data_prepared_before_checksums_trains_unverified_until_prepare_records_them(
    prepared: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    manifest = json.loads((data / "manifest.json").read_text())
    for e in manifest["sources"]:
        del e["sha256"], e["sampled_sha256"]
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))
    args = [f"data.dir={data}", *SMALL_DATA, "train.max_steps=1", "eval.every=0", "checkpoint.every=0"]
    proc = scalegpt("train", SMOKE, f"run.dir={tmp_path / 'run'}", *args)
    lines = [line for line in proc.stdout.splitlines() if "token files" in line]
    assert len(lines) == 1 and "unverified" in lines[0] and "re-run scalegpt prepare" in lines[0], lines
    proc = scalegpt("prepare", SMOKE, f"data.dir={data}", *SMALL_DATA)
    assert "recorded the checksums of arithmetic, scramble, prose" in proc.stdout
    assert json.loads((data / "manifest.json").read_text()) == json.loads((prepared / "manifest.json").read_text())
    proc = scalegpt("train", SMOKE, f"run.dir={tmp_path / 'run2'}", *args)
    lines = [line for line in proc.stdout.splitlines() if "token files" in line]
    assert len(lines) == 1 and "verified: 3 files" in lines[0] and "sha256 of each whole file" in lines[0], lines
