"""Mixture sources: resolve each config entry to concrete inputs, fingerprint them, stream documents.

A source is local files (text, JSONL/JSON or Parquet: a file, a folder or a glob; ``stdlib:`` globs the
running Python's standard library), files downloaded from URLs (download.py), a Hugging Face dataset,
or a built-in generated corpus. Everything that can be checked before reading (missing paths, unknown
corpora, an unreachable Hub, a download that fails its checksum) fails here, before `scalegpt prepare`
writes anything.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar

from ..config.schema import SourceSpec
from ..errors import UserError
from . import builtin, download
from .tokenizer import split_safe

READ_BLOCK = 1 << 20
"""Bytes read at a time from a text file; a document longer than this streams in safe pieces."""

Fragment = tuple[str, bool]
"""A piece of a document's text and whether the document ends with it. Cuts between the pieces of one
document are chunk-safe (tokenizer.split_safe), so tokenizing pieces equals tokenizing the whole."""


@dataclass
class ReadStats:
    """What reading one source found, for the manifest and the user."""

    documents: int = 0
    empty: int = 0
    bad_lines: int = 0
    first_bad: str = ""


Spec = TypeVar("Spec", bound=SourceSpec)
"""A mixture source's SourceConfig, or a reference source's SourceSpec: resolve keeps which."""


@dataclass
class Source(Generic[Spec]):
    """A config source resolved to concrete inputs, with a fingerprint of those inputs."""

    name: str
    kind: Literal["files", "hf", "builtin"]
    spec: str
    cfg: Spec
    fingerprint: str
    files: list[Path] = field(default_factory=list)
    dataset: Any = None  # kind == "hf": the datasets.Dataset (IterableDataset when streaming)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def expand_path(spec: str, source: str = "?") -> list[Path]:
    """A file, a folder (all visible files below it) or a glob; relative to the current directory.

    ``stdlib:PATTERN`` is a glob under the running Python's standard library (a code domain that is
    read at run time, never copied).
    """
    if spec.startswith("stdlib:"):
        base = Path(sysconfig.get_paths()["stdlib"])
        pattern, shown = str(base / spec[len("stdlib:") :]), f"{spec} (under {base})"
    else:
        pattern, shown = os.path.expanduser(spec), f"{spec!r}"
    where = "relative paths are relative to the current directory, " + os.getcwd()
    if glob.has_magic(pattern):
        files: list[Path] = []
        for hit in sorted(glob.glob(pattern, recursive=True)):
            p = Path(hit)
            files.extend(_visible_files(p) if p.is_dir() else [p] if p.is_file() else [])
        if not files:
            raise UserError(f"source {source!r}: path {shown} matches no files ({where})")
        return files
    p = Path(pattern)
    if p.is_dir():
        files = _visible_files(p)
        if not files:
            raise UserError(f"source {source!r}: folder {shown} holds no files; put text in it or remove the source")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"source {source!r}: path {shown} does not exist ({where})")


def _load_hf(src: SourceSpec) -> tuple[Any, dict[str, list[str]]]:
    """The dataset split (a streaming IterableDataset when src.streaming), and the data files it reads
    (for a hub dataset, URLs that name the revision: they fingerprint a streamed source)."""
    import datasets

    files: dict[str, list[str]] = {}
    try:
        if src.streaming:  # nothing downloaded or converted whole: files are read as they are iterated
            builder = datasets.load_dataset_builder(src.hf, src.hf_config)
            ds = builder.as_streaming_dataset(split=src.split)
            files = {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
        else:
            ds = datasets.load_dataset(src.hf, src.hf_config, split=src.split)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"source {src.name!r}: cannot load Hugging Face dataset {src.hf!r} "
            f"(config {src.hf_config!r}, split {src.split!r}): {reason}. Check the name and the network "
            f"(or HF_HUB_OFFLINE); offline, point hf: at a local dataset folder"
        ) from exc
    if not isinstance(ds, datasets.IterableDataset if src.streaming else datasets.Dataset):
        raise UserError(f"source {src.name!r}: {src.hf!r} split {src.split!r} is not a single dataset split")
    if ds.features is not None:  # a streamed JSON dataset may not know its columns before it is read
        _check_text_column(src, ds.features)
    return ds, files


def _check_text_column(src: SourceSpec, features: Any) -> None:
    if src.text_field not in features:
        raise UserError(
            f"source {src.name!r}: dataset {src.hf!r} has no column {src.text_field!r} "
            f"(columns: {', '.join(features)}); set text_field"
        )
    kind = getattr(features[src.text_field], "dtype", None)
    if kind not in ("string", "large_string"):
        raise UserError(
            f"source {src.name!r}: column {src.text_field!r} of {src.hf!r} holds {features[src.text_field]}, "
            f"not text; set text_field to a text column"
        )


def resolve(src: Spec) -> Source[Spec]:
    """Find the source's inputs and fingerprint them (paths + sizes + mtimes, builtin parameters, or the
    Hugging Face dataset's own fingerprint); raise UserError naming the source when they are missing."""
    if src.download and not src.path:
        raise UserError(
            f"source {src.name!r}: download: goes with path: (the files' names under $SCALEGPT_DATA_ROOT), "
            f"not with hf: or builtin:"
        )
    if src.builtin:
        if src.builtin not in builtin.DOMAINS:
            raise UserError(
                f"source {src.name!r}: unknown builtin corpus {src.builtin!r}; choose one of "
                f"{', '.join(builtin.DOMAINS)}"
            )
        if not src.builtin_mb > 0:
            raise UserError(f"source {src.name!r}: builtin_mb must be positive, got {src.builtin_mb}")
        params = {"builtin": src.builtin, "mb": src.builtin_mb, "version": builtin.BUILTIN_VERSION}
        return Source(src.name, "builtin", f"builtin:{src.builtin}", src, _sha(params))
    if src.hf:
        ds, data_files = _load_hf(src)
        local = Path(src.hf)
        stats = _file_stats(_visible_files(local)) if local.is_dir() else []
        key: dict[str, Any] = {"hf": src.hf, "config": src.hf_config, "split": src.split}
        if src.streaming:  # no Arrow cache, so no fingerprint of its own: the files it reads stand in
            key.update(streaming=True, data_files=data_files, files=stats)
        else:
            key.update(fp=ds._fingerprint, files=stats)
        return Source(src.name, "hf", f"hf:{src.hf}", src, _sha(key), dataset=ds)
    assert src.path, "config validation guarantees exactly one of path, hf or builtin"
    if src.download:
        files, spec = download.fetch(src.name, src.path, src.download)
    else:
        files, spec = expand_path(src.path, src.name), src.path
    return Source(src.name, "files", spec, src, _sha({"files": _file_stats(files)}), files=files)


# --- reading --------------------------------------------------------------------------------------


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _format(path: Path) -> Literal["text", "json", "parquet"]:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    last = suffixes[-1].lower() if suffixes else ""
    return "json" if last in (".jsonl", ".json") else "parquet" if last == ".parquet" else "text"


def _decode(data: bytes, where: Path, first_line: int, mode: str, stats: ReadStats) -> str:
    """UTF-8 text of data; with mode 'skip', lines that do not decode are dropped and counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    kept = []
    for k, line in enumerate(data.split(b"\n")):  # a newline byte never occurs inside a UTF-8 sequence
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            at = f"{where}:{first_line + k}"
            if mode == "error":
                raise UserError(
                    f"{at}: invalid UTF-8 (byte {exc.start} of the line); fix the file, or set "
                    f"data.invalid_utf8=skip to drop such lines (they are counted and reported)"
                ) from exc
            stats.bad_lines += 1
            stats.first_bad = stats.first_bad or at
    return "\n".join(kept)


def _text_fragments(path: Path, mode: str, chunk: int | None, stats: ReadStats) -> Iterator[str]:
    """One file, one document, streamed in chunk-safe pieces (or whole when chunk is None)."""
    with _open(path) as f:
        if chunk is None:
            text = _decode(f.read(), path, 1, mode, stats)
            if text:
                yield text
            return
        buf, carry, line = "", b"", 1
        while True:
            block = f.read(READ_BLOCK)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1  # decode whole lines only, so line numbers stay right
                if cut == 0:
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            buf += _decode(data, path, line, mode, stats)
            line += data.count(b"\n")
            if not block:
                break
            if len(buf) >= 2 * chunk:
                *done, buf = split_safe(buf, chunk)
                yield from done
        yield from (p for p in split_safe(buf, chunk) if p)


def _line_documents(path: Path, mode: str, stats: ReadStats) -> Iterator[str]:
    """Each non-empty line of a text file as a document of its own, without its line ending."""
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            text = _decode(raw, path, number, mode, stats).rstrip("\r\n")
            if text.strip():
                yield text


def _json_documents(path: Path, field_: str, mode: str, stats: ReadStats) -> Iterator[str]:
    def text_of(obj: Any, at: str) -> str | None:
        if not isinstance(obj, dict) or field_ not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{at}: no {field_!r} field (found: {keys}); set text_field in the source")
        value = obj[field_]
        if value is not None and not isinstance(value, str):
            raise UserError(f"{at}: field {field_!r} holds a {type(value).__name__}, not text")
        return value

    with _open(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # one JSON array of records
        with _open(path) as f:
            try:
                records = json.loads(_decode(f.read(), path, 1, "error", stats))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        for i, obj in enumerate(records):
            text = text_of(obj, f"{path} record {i}")
            if text is not None:
                yield text
        return
    with _open(path) as f:
        for n, raw in enumerate(f, start=1):
            line = _decode(raw, path, n, mode, stats)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{n}: not valid JSON ({exc.msg}); JSONL sources need one JSON object per line"
                ) from exc
            text = text_of(obj, f"{path}:{n}")
            if text is not None:
                yield text


def _parquet_documents(path: Path, field_: str) -> Iterator[str]:
    import pyarrow as pa  # imported here: only Parquet sources need pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable Parquet file: {exc}") from exc
    if field_ not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {field_!r} (columns: {', '.join(pf.schema_arrow.names)}); set text_field")
    kind = pf.schema_arrow.field(field_).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        text = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        raise UserError(
            f"{path}: column {field_!r} holds {kind}, not text; set text_field to a text column "
            f"({', '.join(text) if text else 'it has none'})"
        )
    for batch in pf.iter_batches(columns=[field_], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _hf_documents(ds: Any, src: SourceSpec) -> Iterator[str]:
    field_ = src.text_field
    if not src.streaming:
        for table in ds.select_columns([field_]).with_format("arrow").iter(batch_size=1024):
            yield from (t for t in table.column(0).to_pylist() if t is not None)
        return
    for batch in ds.iter(batch_size=1024):  # one batch of records in memory at a time
        if field_ not in batch:
            raise UserError(
                f"source {src.name!r}: dataset {src.hf!r} has no field {field_!r} (found: {', '.join(batch)}); "
                f"set text_field"
            )
        for text in batch[field_]:
            if text is not None and not isinstance(text, str):
                kind = type(text).__name__
                raise UserError(f"source {src.name!r}: field {field_!r} of {src.hf!r} holds {kind}, not text")
            if text is not None:
                yield text


DOCUMENT_BATCH_CHARS = 1 << 20
"""Characters of whole documents a curation step takes at once: numpy's and the libraries' per-call cost
amortized, memory bounded."""


def whole_documents(frags: Iterator[Fragment]) -> Iterator[str]:
    """Each document of a source's fragments joined whole, as every curation step judges it."""
    parts: list[str] = []
    for text, end in frags:
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)


def document_batches(frags: Iterator[Fragment], chars: int = DOCUMENT_BATCH_CHARS) -> Iterator[list[str]]:
    """Whole documents in batches of about `chars` characters (a document longer than that is a batch)."""
    batch: list[str] = []
    size = 0
    for doc in whole_documents(frags):
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def fragments(source: Source, *, invalid_utf8: str, chunk: int | None, stats: ReadStats) -> Iterator[Fragment]:
    """The source's documents in order, as (text piece, ends document) pairs; empty documents are
    skipped and counted. chunk=None keeps every document whole (tokenizers that are not chunk-safe)."""

    def whole_docs() -> Iterator[Iterator[str]]:
        if source.kind == "builtin":
            yield from (iter([d]) for d in builtin.generate(source.cfg.builtin or "", source.cfg.builtin_mb))
        elif source.kind == "hf":
            yield from (iter([d]) for d in _hf_documents(source.dataset, source.cfg))
        else:
            for path in source.files:
                kind = _format(path)
                if kind == "text" and source.cfg.text_documents == "line":
                    yield from (iter([d]) for d in _line_documents(path, invalid_utf8, stats))
                elif kind == "text":
                    yield _text_fragments(path, invalid_utf8, chunk, stats)
                elif kind == "json":
                    yield from (iter([d]) for d in _json_documents(path, source.cfg.text_field, invalid_utf8, stats))
                else:
                    yield from (iter([d]) for d in _parquet_documents(path, source.cfg.text_field))

    max_docs, max_bytes = source.cfg.max_documents, (source.cfg.max_mb or 0) * 1e6
    n_bytes = 0
    for doc in whole_docs():
        pending: str | None = None
        for piece in doc:
            if not piece:
                continue
            if pending is not None:
                yield pending, False
            pending = piece
            n_bytes += len(piece.encode("utf-8")) if max_bytes else 0
        if pending is None:
            stats.empty += 1
        else:
            stats.documents += 1
            yield pending, True
            if (max_docs and stats.documents >= max_docs) or (max_bytes and n_bytes >= max_bytes):
                return  # closes the reader: a streamed dataset is read no further
