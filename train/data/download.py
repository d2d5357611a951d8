"""Sources with `download:` URLs: fetched and cached by `datasets`, or read from a local mirror, and
checked against the sha256 each URL carries.

Plain file URLs carry no checksum of their own, so a preset pins each file's bytes with a
``#sha256=<hex>`` suffix (pip's convention for URLs): a file that changed upstream, a damaged
download or a wrong mirror stops `scalegpt prepare` before it tokenizes the wrong text.

``SCALEGPT_DATA_ROOT`` names a folder that already holds the files (CI's offline copy, say): when it is
set, the source's `path` is read under it and nothing is downloaded.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from ..errors import UserError
from .tokenizer import file_sha256

DATA_ROOT_ENV = "SCALEGPT_DATA_ROOT"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def split_url(item: str, source: str) -> tuple[str, str | None]:
    """(URL, expected sha256 or None) of one download entry ``URL[#sha256=HEX]``."""
    url, sep, fragment = item.partition("#")
    if not sep:
        return url, None
    key, _, value = fragment.partition("=")
    if key != "sha256" or not _SHA256.fullmatch(value.lower()):
        raise UserError(
            f"source {source!r}: download entry {item!r} must end in #sha256=<64 hex digits>, or carry no '#'"
        )
    return url, value.lower()


def fetch(source: str, path: str, urls: list[str]) -> tuple[list[Path], str]:
    """(the source's files, a short description of where they came from), every file checked."""
    entries = [split_url(item, source) for item in urls]
    root = os.environ.get(DATA_ROOT_ENV)
    if root:
        return _from_root(source, Path(root).expanduser(), path, entries), f"{path} under {root}"
    return [_download(source, url, want) for url, want in entries], " ".join(url for url, _ in entries)


def _from_root(source: str, root: Path, path: str, entries: list[tuple[str, str | None]]) -> list[Path]:
    """The files `path` names under the data root, paired in sorted order with the download entries."""
    pattern = str(root / path)
    hits = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    files = [Path(h) for h in hits if Path(h).is_file()]
    if len(files) != len(entries):
        raise UserError(
            f"source {source!r}: {DATA_ROOT_ENV}={root} holds {len(files)} file(s) matching {path!r}, but the "
            f"source downloads {len(entries)}; put its files there, or unset {DATA_ROOT_ENV} to download them"
        )
    for f, (url, want) in zip(files, entries, strict=True):
        got = file_sha256(f) if want else None
        if got != want:
            raise UserError(
                f"source {source!r}: {f} has sha256 {got}, but {url} should have {want}; replace it with a "
                f"fresh copy of that URL, or unset {DATA_ROOT_ENV} to download it"
            )
    return files


def _download(source: str, url: str, want: str | None) -> Path:
    """The URL's file in datasets' download cache (downloaded on first use), checked when want is given."""
    import datasets

    try:
        local = Path(datasets.DownloadManager().download(url))
    except Exception as exc:  # network, HTTP and file-system errors all mean "not available"
        reason = _reason(exc, url)
        raise UserError(
            f"source {source!r}: cannot download {url}: {reason}. Check the network (or HF_DATASETS_OFFLINE), "
            f"or set {DATA_ROOT_ENV} to a folder that already holds the source's files"
        ) from exc
    got = file_sha256(local) if want else None
    if got != want:
        raise UserError(
            f"source {source!r}: {url} has sha256 {got}, not the {want} the source expects (read from {local}); "
            f"if that is a damaged download, delete it to fetch it again; if the file changed upstream, "
            f"check it and update the #sha256= suffix"
        )
    return local


def _reason(exc: BaseException, url: str) -> str:
    """The innermost cause's first line: fsspec wraps a DNS or HTTP failure in a FileNotFoundError that
    only repeats the URL."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return type(exc).__name__ if text in ("", url) else text
