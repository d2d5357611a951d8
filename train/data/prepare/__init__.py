"""`scalegpt prepare CONFIG`: sources -> tokenizer -> one memory-mapped token file per source + manifest.

The work runs in three phases so that bad input never costs existing data, and streams, so that memory
stays flat however large the corpus is:

1. check (plan.py): resolve every source (missing paths, unknown corpora, an unreachable Hub) and find
   the tokenizer; when a BPE must be trained, read every source once into an Arrow file of ~64 KB rows in
   a scratch folder and train it on a weighted sample (read.py);
2. tokenize (workers.py, accounting.py): each stale source's rows, read straight from the source (or
   from that Arrow file), go in small batches to num_proc worker processes; documents are packed with
   <|endoftext|> after each one (GPT-3 Appendix B) and the ids go to the source's token file in the
   scratch folder, with its document ends beside it; its counts, checks and train/validation split
   come from those files;
3. write (write.py): tokenizer.json, each finished token file renamed into place, and the manifest,
   each atomically.

data.dir is locked for the whole run (lock.py). A source whose fingerprint, settings and tokenizer match
its manifest entry is left alone, so re-running with unchanged inputs does nothing, and a changed source
is re-prepared alone; what a killed run had finished is taken over (resume.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ...config.loading import load_config
from ...config.schema import Config
from ...errors import Terminated, check_writable_dir, disk_full_is_a_user_error, sigterm_raises
from ...osutil import write_json_atomic
from ..checksum import fill_missing
from ..curation_report import report_lines
from ..mixture import MANIFEST, Mixture, describe
from ..tokenizer import save_tokenizer, token_byte_lengths
from .accounting import SourceTokens, summarize
from .lock import Scratch
from .plan import TOKENIZER_FILE, Echo, PreparePlan, Tok, Work, plan_prepare, planned_samples
from .read import (
    PIECE_CHARS,
    ROW_CHARS,
    batched,
    read_sources,
    report,
    source_rows,
    stored_rows,
    train_tokenizer,
    work_rows,
)
from .resume import adopt, finished
from .workers import Encoder, quiet_datasets
from .write import say_filled, write_all

__all__ = ["PIECE_CHARS", "ROW_CHARS", "TOKENIZER_FILE", "planned_samples", "prepare", "prepare_command"]


def prepare_command(args: argparse.Namespace) -> int:
    """The CLI entry point (launch/cli.py dispatches `scalegpt prepare` here). SIGTERM stops it as cleanly
    as Ctrl-C does (which the CLI reports as interrupted, exit 130), with exit 143."""
    try:
        with sigterm_raises():
            cfg = load_config(args.config, args.overrides)
            check_writable_dir(cfg.data.dir, "data.dir")
            with disk_full_is_a_user_error(cfg.data.dir, "the prepared data (data.dir keeps only complete sources)"):
                prepare(cfg)
    except Terminated:
        print("scalegpt: terminated; data.dir keeps only complete sources; re-run to finish", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def prepare(cfg: Config, *, echo: Echo = print) -> dict[str, Any]:
    """Tokenize every source of cfg.data that is not already up to date in cfg.data.dir, print the mixture
    table for the planned run, and return the manifest. Bad input raises UserError and leaves data.dir
    as it was."""
    plan, tok = plan_prepare(cfg, echo)
    old = plan.old
    if old is not None and tok is not None and old["tokenizer_hash"] != tok.hash:
        echo(f"the tokenizer changed ({old['tokenizer_hash'][:12]} -> {tok.hash[:12]}): re-preparing every source")
    stale = plan.stale(tok.hash if tok is not None else None)
    if stale:
        manifest = _run(plan, stale, tok, echo)
    else:
        assert tok is not None and old is not None
        sha = save_tokenizer(tok.tok, plan.data_dir / TOKENIZER_FILE)
        entries = {e["name"]: e for e in old["sources"]}
        say_filled(fill_missing(plan.data_dir, entries), echo)
        manifest = plan.manifest(entries, tok, sha)
        if manifest != old:
            write_json_atomic(plan.data_dir / MANIFEST, manifest, indent=1)
        plan.drop_removed(echo)
        echo(
            f"nothing to do: all {len(plan.sources)} sources in {plan.data_dir} are up to date "
            f"(tokenizer {tok.hash[:12]})"
        )
    plan.save_quality(manifest, echo)
    for line in report_lines(manifest["sources"]):
        echo(line)
    echo(describe(Mixture.for_config(cfg, data_dir=plan.data_dir), planned_samples(cfg)))
    return manifest


def _run(plan: PreparePlan, stale: list[int], tok: Tok | None, echo: Echo) -> dict[str, Any]:
    """The three phases for the stale sources (every source when the BPE must be trained)."""
    quiet_datasets()
    indices = range(len(plan.sources)) if tok is None else stale
    work = [Work(i, plan.sources[i], quality=plan.quality_filter(i), dedup_job=plan.dedup_job(i)) for i in indices]
    echo(f"preparing {len(work)} of {len(plan.sources)} sources into {plan.data_dir}")
    chunk = PIECE_CHARS if plan.chunked else None
    with Scratch(plan.data_dir) as scratch:
        t0 = time.perf_counter()
        stored = None
        if tok is None:  # the BPE needs a sample of every source before anything is tokenized
            stored = scratch.path / "text.arrow"
            read_sources(work, plan.cfg, chunk, stored, echo)
            tok, work = _train(plan, work, stored, echo)
        files = _tokenize(plan, work, tok, scratch, stored, echo)
        mb, seconds = sum(w.chars for w in work) / 1e6, time.perf_counter() - t0
        echo(
            f"  read and tokenized {mb:.2f} MB in {seconds:.1f}s "
            f"({mb / max(seconds, 1e-9):.2f} MB/s with up to {plan.cfg.data.num_proc} workers)"
        )
        return write_all(plan, work, files, tok, echo)


def _train(plan: PreparePlan, work: list[Work], stored: Path, echo: Echo) -> tuple[Tok, list[Work]]:
    """The BPE trained on the stored rows, and the sources it leaves stale (all, unless it came out as before)."""
    import datasets

    tok = Tok.of(train_tokenizer(plan.cfg, work, datasets.Dataset.from_file(str(stored)), echo))
    todo = set(plan.stale(tok.hash))
    if len(todo) < len(work):
        echo(f"  the tokenizer came out unchanged: {len(work) - len(todo)} source(s) are up to date")
    return tok, [w for w in work if w.index in todo]


def _tokenize(
    plan: PreparePlan, work: list[Work], tok: Tok, scratch: Scratch, stored: Path | None, echo: Echo
) -> list[Path]:
    """Phase 2: each worked source's token file finished in the scratch folder, with its manifest entry
    counted; every check passes before phase 3 changes data.dir. Sources read from `stored` when given."""
    if not work:  # the BPE came out as before and every source is up to date
        return []
    cfg, byte_len = plan.cfg, token_byte_lengths(tok.tok)
    chunk = PIECE_CHARS if plan.chunked else None
    rows = stored_rows(stored) if stored is not None else None
    consumed, files = 0, []
    with Encoder(
        tok.tok, tok.hash, tok.eot, plan.dtype, cfg.data.num_proc, scratch=scratch.path, lock_fd=scratch.lock_fd
    ) as enc:
        for w in work:
            settings = {"settings": plan.settings(w.index), "tokenizer_hash": tok.hash}
            done = adopt(scratch, w, settings, plan.dtype)
            if done is not None:
                files.append(done)
                echo(f"  {w.source.name}: taking over the tokens an interrupted run had finished")
                continue
            source = work_rows(rows, consumed, w) if rows is not None else source_rows(w, cfg, chunk)
            out = SourceTokens(scratch.path, w.source.name, plan.dtype)
            for encoded in enc.map(batched(source)):
                out.add(encoded)
            out.finish()
            consumed = w.rows[1]
            if rows is None:
                report(w, echo)  # an empty source stops the run here, before data.dir changes
            w.entry = {**summarize(w, out, cfg, byte_len), **settings}
            if w.curation is not None:
                w.entry["curation"] = {"decontaminate": w.curation.row()}
            if w.quality is not None:
                w.entry.setdefault("curation", {})["quality"] = w.quality.stats.row()
            if w.dedup_stats is not None:
                w.entry.setdefault("curation", {})["dedup"] = w.dedup_stats.row()
            finished(out.path, w.entry, w.chars)
            files.append(out.path)
    return files
