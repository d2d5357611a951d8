"""What a prepare run finds before doing any work: the sources, the tokenizer, and which sources are stale."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ...config.schema import Config, SourceConfig
from ...errors import UserError
from ...schedule import run_totals
from .. import sources as src_mod
from ..mixture import FORMAT, check_tokenizer_file, read_manifest
from ..tokenizer import (
    PACKAGED_TOKENIZERS,
    check_tokenizer,
    eot_id,
    is_chunk_safe,
    load_tokenizer,
    token_dtype,
    tokenizer_hash,
)
from . import decontaminate, dedup, quality, staged
from .decontaminate import DecontaminationStats

TOKENIZER_FILE = "tokenizer.json"

Echo = Callable[[str], None]


@dataclass
class Work:
    """A source being (re-)prepared, and what reading and tokenizing it found."""

    index: int
    source: src_mod.Source[SourceConfig]
    stats: src_mod.ReadStats = field(default_factory=src_mod.ReadStats)
    rows: tuple[int, int] = (0, 0)
    chars: int = 0
    entry: dict[str, Any] = field(default_factory=dict)
    curation: DecontaminationStats | None = None
    quality: quality.QualityFilter | None = None
    dedup_job: dedup.DedupJob | None = None
    dedup_stats: dedup.DedupStats | None = None


@dataclass
class Tok:
    """A tokenizer with the facts about it that are costly to recompute (GPT-2's JSON is megabytes)."""

    tok: Tokenizer
    hash: str
    eot: int

    @classmethod
    def of(cls, tok: Tokenizer) -> Tok:
        return cls(tok, tokenizer_hash(tok), eot_id(tok))


def file_name(name: str) -> str:
    """<name>.bin, made filesystem-safe (with a hash suffix whenever the name had to change)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "source"
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{safe}.bin"


def planned_samples(cfg: Config) -> int:
    """Samples of the planned run at one process, through the batch ramp (run_totals). `prepare` cannot know the
    world size; with train.global_batch=0 a launch of N processes draws N times as many, which the trainer's
    epochs table shows."""
    return run_totals(cfg, world_size=1).samples


@dataclass
class PreparePlan:
    """What a prepare run found before doing any work."""

    cfg: Config
    data_dir: Path
    dtype: np.dtype
    recipe: dict[str, Any]
    sources: list[src_mod.Source[SourceConfig]]
    """The mixture's sources, the ones prepared (data.reference_sources are only read by curation steps)."""
    old: dict[str, Any] | None
    chunked: bool
    classifiers: dict[int, quality.Classifier] = field(default_factory=dict)
    """Source index -> the quality classifier that filters it (trained or loaded before any work)."""

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def settings(self, i: int) -> dict[str, Any]:
        """Everything besides the inputs and the tokenizer that changes source i's token file."""
        source = self.sources[i]
        out: dict[str, Any] = {
            "format": FORMAT,
            "val_fraction": self.cfg.data.val_fraction,
            "invalid_utf8": self.cfg.data.invalid_utf8,
            "text_field": source.cfg.text_field if source.kind != "builtin" else None,
            "chunked": self.chunked,
        }
        curation = decontaminate.settings(source.cfg.curation.decontaminate, f"data.sources.{i}.curation.decontaminate")
        if curation is not None:  # only when set, so older manifests stay up to date
            out["curation"] = {"decontaminate": curation}
        q = quality.settings(source.cfg.curation.quality, self.classifiers.get(i))
        if q is not None:
            out.setdefault("curation", {})["quality"] = q
        against = self.dedup_against(i)
        if against is not None:
            out.setdefault("curation", {})["dedup"] = dedup.settings(source.cfg.curation.dedup, against)
        for key in ("max_documents", "max_mb"):  # only when set, so older manifests stay up to date
            if getattr(source.cfg, key) is not None:
                out[key] = getattr(source.cfg, key)
        if source.cfg.text_documents != "file":  # likewise
            out["text_documents"] = source.cfg.text_documents
        return out

    def quality_filter(self, i: int) -> quality.QualityFilter | None:
        """Source i's quality step, when it has one."""
        clf = self.classifiers.get(i)
        if clf is None:
            return None
        figure = quality.stem(self.data_dir, file_name(self.sources[i].name))
        step = quality.QualityFilter.of(
            self.sources[i].cfg.curation.quality, clf, f"{figure.relative_to(self.data_dir)}.png"
        )
        step.staged = staged.Staged.load(
            staged.folder(self.data_dir, file_name(self.sources[i].name)), self.staged_key(i), "quality"
        )
        return step

    def staged_key(self, i: int) -> staged.Key:
        """The key under which `scalegpt curate` stages source i's per-document work, and prepare finds it."""
        clf = self.classifiers.get(i)
        rule = quality.KeepRule.of(self.sources[i].cfg.curation.quality).row()
        q = None if clf is None else json.dumps({"classifier": clf.fingerprint, **rule}, sort_keys=True)
        cfg = self.sources[i].cfg.curation.dedup
        on = dedup.check(cfg, f"data.sources.{i}.curation.dedup", self.names, i)
        d = json.dumps(dedup.signature_settings(cfg), sort_keys=True) if on else None
        return staged.Key(self.sources[i].fingerprint, q, d)

    def save_quality(self, manifest: dict[str, Any], echo: Echo) -> None:
        """The classifiers trained in this run, and the score figures, saved once the manifest is written."""
        trained = {
            self.sources[i].name: (clf, quality.stem(self.data_dir, file_name(self.sources[i].name)))
            for i, clf in self.classifiers.items()
        }
        quality.save_outputs(self.data_dir, trained, manifest, self.old, echo)

    def dedup_against(self, i: int) -> dict[str, str] | None:
        """Source i's dedup `against` sources with their indexes' fingerprints; None when its dedup is off."""
        cfg = self.sources[i].cfg.curation.dedup
        if not dedup.check(cfg, f"data.sources.{i}.curation.dedup", self.names, i):
            return None
        return {name: self.index_fingerprint(self.names.index(name)) for name in cfg.against}

    def index_fingerprint(self, i: int) -> str:
        """What source i's dedup index is a function of: its inputs and settings (those it is deduplicated
        against included), so re-preparing a source re-prepares the sources deduplicated against it."""
        what = {"fingerprint": self.sources[i].fingerprint, "settings": self.settings(i)}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def dedup_job(self, i: int) -> dedup.DedupJob | None:
        """What source i's dedup step needs, or None when it is off."""
        against = self.dedup_against(i)
        if against is None:
            return None
        index = lambda j: dedup.index_path(self.data_dir, file_name(self.names[j])[: -len(".bin")])  # noqa: E731
        others = [(n, index(self.names.index(n)), fp) for n, fp in against.items()]
        where = staged.folder(self.data_dir, file_name(self.names[i]))
        ahead = staged.Staged.load(where, self.staged_key(i), "dedup")
        return dedup.DedupJob(self.sources[i].cfg.curation.dedup, index(i), self.index_fingerprint(i), others, ahead)

    def old_entry(self, name: str) -> dict[str, Any] | None:
        return next((e for e in (self.old or {}).get("sources", []) if e["name"] == name), None)

    def stale(self, tok_hash: str | None) -> list[int]:
        """Indices of the sources whose token files must be (re-)made with the tokenizer of this hash."""
        return [i for i, s in enumerate(self.sources) if not self._up_to_date(i, s, tok_hash)]

    def _up_to_date(self, i: int, source: src_mod.Source, tok_hash: str | None) -> bool:
        entry = self.old_entry(source.name)
        if entry is None or tok_hash is None:
            return False
        path = self.data_dir / entry["file"]
        return (
            entry["fingerprint"] == source.fingerprint
            and entry["settings"] == self.settings(i)
            and entry["tokenizer_hash"] == tok_hash
            and path.is_file()
            and path.stat().st_size == entry["tokens"] * self.dtype.itemsize
            and dedup.index_ok(self.dedup_job(i))
        )

    def manifest(self, entries: dict[str, dict[str, Any]], tok: Tok, file_sha: str) -> dict[str, Any]:
        weights = {s.name: s.cfg.weight for s in self.sources}
        return {
            "format": FORMAT,
            "tokenizer_hash": tok.hash,
            "tokenizer_file": TOKENIZER_FILE,
            "tokenizer_file_sha256": file_sha,
            "tokenizer_recipe": self.recipe,
            "vocab_size": self.cfg.model.vocab_size,
            "eot_id": tok.eot,
            "dtype": self.dtype.name,
            "sources": [{**entries[n], "weight": weights[n]} for n in self.names if n in entries],
        }

    def drop_removed(self, echo: Echo) -> None:
        for e in (self.old or {}).get("sources", []):
            if e["name"] not in self.names:
                (self.data_dir / e["file"]).unlink(missing_ok=True)
                echo(f"  removed source {e['name']!r} (no longer in data.sources) and its token file")


def plan_prepare(cfg: Config, echo: Echo = print) -> tuple[PreparePlan, Tok | None]:
    """Check the config's data section and find its sources; the tokenizer too, unless a BPE must be
    trained after reading (then None). Raises UserError before anything is written."""
    d = cfg.data
    if not d.sources:
        raise UserError("data.sources is empty; add at least one source (see configs/data/builtin.yaml)")
    dtype = token_dtype(cfg.model.vocab_size)
    data_dir = Path(d.dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data.dir {data_dir} is a file, not a folder; point data.dir at a folder")
    old = read_manifest(data_dir)
    if old is not None and (data_dir / TOKENIZER_FILE).is_file():
        check_tokenizer_file(data_dir, old)
    sources = [src_mod.resolve(s) for s in d.sources]
    for i, s in enumerate(d.sources):  # bad curation settings fail before anything is read or written
        decontaminate.check(s.curation.decontaminate, f"data.sources.{i}.curation.decontaminate")
        quality.check(s.curation.quality, f"data.sources.{i}.curation.quality", d, s.name)
        dedup.check(s.curation.dedup, f"data.sources.{i}.curation.dedup", [t.name for t in d.sources], i)
    dedup.check_against([s.curation.dedup for s in d.sources], [t.name for t in d.sources])
    recipe, tok = _tokenizer(cfg, data_dir, old)
    plan = PreparePlan(cfg, data_dir, dtype, recipe, sources, old, tok is None or is_chunk_safe(tok.tok))
    by_name: dict[str, src_mod.Source[Any]] = {s.name: s for s in sources}
    by_name.update((s.name, s) for s in _reference_sources(cfg, echo))
    for i, s in enumerate(sources):  # the classifiers' fingerprints are part of their sources' settings
        if quality.active(s.cfg.curation.quality):
            where = quality.stem(data_dir, file_name(s.name))
            key = f"data.sources.{i}.curation.quality"
            plan.classifiers[i] = quality.classifier_for(s.cfg.curation.quality, key, s, by_name, d, where)
            echo(quality.describe(s.name, plan.classifiers[i]))
    return plan, tok


def _reference_sources(cfg: Config, echo: Echo) -> list[src_mod.Source[Any]]:
    """The reference sources that a classifier is trained on, resolved (so a missing one fails before any work);
    one that no step reads is left unread with a warning, since naming it was likely meant to matter."""
    read = quality.trained_on(cfg.data)
    out = []
    for ref in cfg.data.reference_sources:
        if ref.name in read:
            out.append(src_mod.resolve(ref))
        else:
            echo(
                f"warning: reference source {ref.name!r} is not read: no quality step trains on it (name it in a "
                "curation.quality's positives or negatives, or remove it from data.reference_sources)"
            )
    return out


def _tokenizer(cfg: Config, data_dir: Path, old: dict[str, Any] | None) -> tuple[dict[str, Any], Tok | None]:
    """(recipe, tokenizer): reuse the BPE trained before, load the configured one, or None to train one."""
    d, vocab, stored = cfg.data, cfg.model.vocab_size, data_dir / TOKENIZER_FILE
    if d.tokenizer == "bpe":
        recipe: dict[str, Any] = {"kind": "bpe", "vocab_size": vocab, "sample_mb": d.tokenizer_sample_mb}
        if old is None or old.get("tokenizer_recipe") != recipe or not stored.is_file():
            return recipe, None
        loaded = load_tokenizer(stored)  # sources may change; the tokenizer stays unless its recipe does
        check_tokenizer(loaded, vocab, str(stored))
        return recipe, Tok(loaded, old["tokenizer_hash"], eot_id(loaded))  # check_tokenizer_file vouched for it
    if d.tokenizer in PACKAGED_TOKENIZERS:
        recipe = {"kind": "packaged", "name": d.tokenizer}
    else:
        recipe = {"kind": "file", "path": d.tokenizer}
    loaded = load_tokenizer(d.tokenizer)
    check_tokenizer(loaded, vocab, d.tokenizer)
    return recipe, Tok.of(loaded)
