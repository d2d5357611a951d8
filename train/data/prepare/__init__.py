"""`scalegpt prepare CONFIG`: sources -> tokenizer -> one memory-mapped token file per source + manifest.

The work runs in three phases so that bad input never costs existing data:

1. check and read (plan.py, read.py): resolve every source (missing paths, unknown corpora, an
   unreachable Hub), read the sources that need work into one Arrow file of ~64 KB rows in a scratch
   folder (invalid UTF-8 and empty sources are found here), and train the BPE on a weighted sample if
   it is needed;
2. tokenize (workers.py): one `datasets` map with num_proc workers over all those rows; documents are
   packed with <|endoftext|> after each one (GPT-3 Appendix B); then every count and the
   train/validation split are computed from the tokenized rows (accounting.py);
3. write (write.py): tokenizer.json, the token files and the manifest, each atomically.

data.dir is locked for the whole run (lock.py). A source whose fingerprint, settings and tokenizer match
its manifest entry is left alone, so re-running with unchanged inputs does nothing, and a changed source
is re-prepared alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ...config import Config, load_config
from ...osutil import write_json_atomic
from ..mixture import MANIFEST, Mixture, describe
from ..tokenizer import save_tokenizer, token_byte_lengths
from .accounting import summarize
from .lock import Scratch
from .plan import TOKENIZER_FILE, Echo, Plan, Tok, Work, make_plan, planned_samples
from .read import PIECE_CHARS, ROW_CHARS, read_sources, train_tokenizer
from .workers import quiet_datasets, tokenize
from .write import write_all

__all__ = ["PIECE_CHARS", "ROW_CHARS", "TOKENIZER_FILE", "planned_samples", "prepare", "prepare_command"]


def prepare_command(args: argparse.Namespace) -> int:
    """The CLI entry point (launch/cli.py dispatches `scalegpt prepare` here)."""
    prepare(load_config(args.config, args.overrides))
    return 0


def prepare(cfg: Config, *, echo: Echo = print) -> dict[str, Any]:
    """Tokenize every source of cfg.data that is not already up to date in cfg.data.dir, print the mixture
    table for the planned run, and return the manifest. Bad input raises UserError and leaves data.dir
    as it was."""
    plan, tok = make_plan(cfg)
    old = plan.old
    if old is not None and tok is not None and old["tokenizer_hash"] != tok.hash:
        echo(f"the tokenizer changed ({old['tokenizer_hash'][:12]} -> {tok.hash[:12]}): re-preparing every source")
    stale = plan.stale(tok.hash if tok is not None else None)
    if stale:
        manifest = _run(plan, stale, tok, echo)
    else:
        assert tok is not None and old is not None
        sha = save_tokenizer(tok.tok, plan.data_dir / TOKENIZER_FILE)
        manifest = plan.manifest({e["name"]: e for e in old["sources"]}, tok, sha)
        if manifest != old:
            write_json_atomic(plan.data_dir / MANIFEST, manifest, indent=1)
        plan.drop_removed(echo)
        echo(
            f"nothing to do: all {len(plan.sources)} sources in {plan.data_dir} are up to date "
            f"(tokenizer {tok.hash[:12]})"
        )
    weights = {s.name: s.cfg.weight for s in plan.sources}
    echo(describe(Mixture(plan.data_dir, cfg.model.n_ctx, cfg.run.seed, weights), planned_samples(cfg)))
    return manifest


def _run(plan: Plan, stale: list[int], tok: Tok | None, echo: Echo) -> dict[str, Any]:
    """The three phases for the stale sources (every source when the BPE must be trained)."""
    quiet_datasets()
    indices = range(len(plan.sources)) if tok is None else stale
    work = [Work(i, plan.sources[i]) for i in indices]
    echo(f"preparing {len(work)} of {len(plan.sources)} sources into {plan.data_dir}")
    with Scratch(plan.data_dir) as scratch:
        t0 = time.perf_counter()
        ds = _read(plan, work, scratch, echo)
        t_read = time.perf_counter() - t0
        if tok is None:
            tok, work = _train(plan, work, ds, echo)
        table = _tokenize(plan, work, ds, tok, scratch.path, t_read, echo) if work else None
        byte_len = token_byte_lengths(tok.tok)
        spans, row = [], 0
        for w in work:  # every count and check before the first write
            spans.append((row, row + w.rows[1] - w.rows[0]))
            w.entry = summarize(w, table, spans[-1], plan.cfg, byte_len)
            w.entry.update(settings=plan.settings(w.index), tokenizer_hash=tok.hash)
            row = spans[-1][1]
        return write_all(plan, work, spans, table, tok, scratch, echo)


def _read(plan: Plan, work: list[Work], scratch: Scratch, echo: Echo) -> Any:
    """Phase 1: the rows of every worked source, as a dataset over an Arrow file in the scratch folder."""
    import datasets

    text = scratch.path / "text.arrow"
    read_sources(work, plan.cfg, PIECE_CHARS if plan.chunked else None, text, echo)
    return datasets.Dataset.from_file(str(text))


def _train(plan: Plan, work: list[Work], ds: Any, echo: Echo) -> tuple[Tok, list[Work]]:
    """The BPE trained on the rows, and the sources it leaves stale (all, unless it came out as before)."""
    tok = Tok.of(train_tokenizer(plan.cfg, work, ds, echo))
    todo = set(plan.stale(tok.hash))
    if len(todo) < len(work):
        echo(f"  the tokenizer came out unchanged: {len(work) - len(todo)} source(s) are up to date")
    return tok, [w for w in work if w.index in todo]


def _tokenize(plan: Plan, work: list[Work], ds: Any, tok: Tok, scratch: Path, t_read: float, echo: Echo) -> Any:
    """Phase 2: the worked sources' rows tokenized, as an Arrow-formatted dataset."""
    t1 = time.perf_counter()
    rows = [r for w in work for r in range(*w.rows)]
    subset = ds if len(rows) == len(ds) else ds.select(rows)
    num_proc = plan.cfg.data.num_proc
    out = tokenize(subset, tok.tok, tok.hash, plan.dtype, num_proc, scratch)
    mb, t_tok = sum(w.chars for w in work) / 1e6, time.perf_counter() - t1
    echo(
        f"  read {mb:.2f} MB in {t_read:.1f}s, tokenized it in {t_tok:.1f}s "
        f"({mb / max(t_tok, 1e-9):.2f} MB/s with up to {num_proc} workers)"
    )
    return out.with_format("arrow")
