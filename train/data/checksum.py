"""Checksums of the token files: recorded by `scalegpt prepare`, checked once before a run trains.

The size check and the id-range scan at load catch a truncated file and foreign bytes, but not a block of
valid ids written over another (a bad copy, a stray script, a disk fault): that trains without a word on
text nobody prepared. Each manifest entry therefore carries two digests of its token file:

- `sha256`: of the whole file, computed as prepare writes it (no second read);
- `sampled_sha256`: of the file's size and SAMPLE_BLOCKS blocks of SAMPLE_BYTES at evenly spaced offsets
  (the first and the last included): it reads at most 64 MiB, whatever the size.

A run hashes the files whole when together they hold at most FULL_HASH_MAX_BYTES, and checks the sampled
digests otherwise, so the check stays under about half a minute. sha256 ran at 0.87-0.96 GB/s through
hashlib.file_digest on a 1 GiB file from the page cache (AMD EPYC with SHA extensions, 2 busy cores,
2026-12-07); 8 GiB is then about 9 s, and about 30 s where the filesystem reads at only 0.3 GB/s (a
loaded network filesystem). The sampled check misses a change that falls wholly between its blocks; it
is there to catch a swapped or rewritten file, not a flipped bit in a 100 GB corpus.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import UserError

FULL_HASH_MAX_BYTES = 8 << 30
"""Token files hashed whole up to this total size (see the module docstring for the measurement)."""
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 1 << 20


def full_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sampled_sha256(path: Path) -> str:
    """sha256 of the size and SAMPLE_BLOCKS evenly spaced blocks: the whole file when it is small."""
    size = path.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            last = size - SAMPLE_BYTES
            for k in range(SAMPLE_BLOCKS):
                f.seek(last * k // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def checksums(path: Path, sha256: str | None = None) -> dict[str, str]:
    """The manifest's digests of a token file (`sha256` when the writer has already computed it)."""
    return {"sha256": sha256 or full_sha256(path), "sampled_sha256": sampled_sha256(path)}


def fill_missing(data_dir: Path, entries: dict[str, dict[str, Any]]) -> list[str]:
    """Record the digests of up-to-date entries that a prepare before checksums left without them, so that
    re-running prepare makes such a data dir verifiable; return their names. The files are hashed as they
    are now: this vouches for them from here on, not for what happened to them before."""
    named = []
    for name, e in entries.items():
        path = data_dir / e["file"]
        if "sha256" not in e and path.is_file():
            entries[name] = {**e, **checksums(path)}  # a new dict: the caller compares with the old manifest
            named.append(name)
    return named


def verify(data_dir: Path, manifest: dict[str, Any]) -> str:
    """Check every token file against its recorded digest; return the one line that says which check ran.
    A mismatch is a UserError naming the file."""
    entries = manifest["sources"]
    paths = [data_dir / e["file"] for e in entries]
    unrecorded = [e["name"] for e in entries if "sha256" not in e]
    if unrecorded:
        return (
            f"token files unverified: {data_dir / 'manifest.json'} records no checksum for "
            f"{', '.join(unrecorded)} (prepared before checksums); re-run scalegpt prepare to record them"
        )
    total = sum(p.stat().st_size for p in paths)
    whole = total <= FULL_HASH_MAX_BYTES
    for e, path in zip(entries, paths, strict=True):
        found = full_sha256(path) if whole else sampled_sha256(path)
        if found != (e["sha256"] if whole else e["sampled_sha256"]):
            raise UserError(
                f"token file {path} does not match the checksum prepare recorded for it: it was changed after "
                f"prepare; delete it and re-run scalegpt prepare to make it again"
            )
    how = (
        "sha256 of each whole file"
        if whole
        else f"size and {SAMPLE_BLOCKS} sampled blocks of {SAMPLE_BYTES >> 20} MiB each (over "
        f"{FULL_HASH_MAX_BYTES >> 30} GiB in all: a whole hash would take too long)"
    )
    return f"token files verified: {len(paths)} files, {total / 1e6:,.1f} MB, {how}"
