"""`scalegpt inspect CONFIG_OR_RUN_DIR [key=value ...] --steps A:B [--json FILE] [--show N]`: what steps
A to B-1 of a run train on, before the run spends an hour on them or after a loss spike at one of them.

It walks the steps as the trainer does (train/data/steps.py: the same batch sizes, the same per-rank
sample indices, the skipped ranges a run directory recorded) and resolves the samples with the
trainer's Mixture, built from the run's own config, so its counts are the ones metrics.jsonl records
as drawn/<source>. Steps are numbered as metrics.jsonl numbers them, from 1. A run directory's skipped
ranges come from its skipped.json (through the trainer's SkipLog); a run without one skipped nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..train.config.loading import load_config
from ..train.config.schema import Config
from ..train.data.curation_report import dropped_lines, report_lines
from ..train.data.mixture import Mixture, describe, read_manifest
from ..train.data.steps import StepSpan, rank_indices, step_spans
from ..train.data.tokenizer import load_tokenizer, tokenizer_hash
from ..train.errors import UserError, check_writable_file
from ..train.osutil import write_json_atomic
from ..train.recovery import SkipLog
from ..train.rundir import CONFIG, TOKENIZER, metrics_rows
from ..train.schedule import Schedule, run_totals

EXACT_LIMIT = 1 << 21
"""Up to this many samples every index is resolved, as the trainer resolves them; past it the counts come
from the sampler's closed form (Mixture.stage_counts, which the tests hold equal to resolving)."""

RESOLVE_CHUNK = 1 << 18
"""Indices resolved at once when counting exactly: a few MB of arrays at a time."""


@dataclass(frozen=True)
class Target:
    """What was asked about: the run's resolved config, and its run directory and skip log if one was given."""

    cfg: Config
    run_dir: Path | None
    skips: SkipLog | None

    @property
    def skipped(self) -> list[tuple[int, int]]:
        return sorted((s.start, s.end) for s in self.skips.skips) if self.skips is not None else []


def parse_steps(text: str) -> tuple[int, int]:
    first, sep, stop = text.partition(":")
    try:
        a, b = int(first), int(stop)
    except ValueError:
        a, b = 0, -1
    if not sep or not 1 <= a < b:
        raise UserError(f"--steps {text!r} must be A:B with 1 <= A < B (steps A to B-1, numbered as in metrics.jsonl)")
    return a, b


def open_target(spec: str, overrides: list[str]) -> Target:
    """A run directory (its config.yaml and skipped ranges) or a run config, with the overrides applied."""
    path = Path(spec)
    if path.is_dir():
        config = path / CONFIG
        if not config.is_file():
            raise UserError(f"{path} has no {CONFIG}; pass a run directory that has started, or a run config")
        return Target(load_config(config, overrides), path, SkipLog(path))
    return Target(load_config(spec, overrides), None, None)


def _world_size(target: Target, asked: int | None) -> int:
    """--world-size, else the run's own (its last metrics row), else 1. It matters only when
    train.global_batch is 0 (one micro batch per rank)."""
    if asked is not None:
        if asked < 1:
            raise UserError(f"--world-size must be at least 1, got {asked}")
        return asked
    rows = metrics_rows(target.run_dir)[0] if target.run_dir else []
    sizes = [row["world_size"] for row in rows if isinstance(row.get("world_size"), int)]
    return sizes[-1] if sizes else 1


def step_indices(span: StepSpan, *, micro_batch: int, world_size: int) -> list[int]:
    """Every sample of one step, rank by rank, through the trainer's own rank_indices."""
    out: list[int] = []
    for rank in range(world_size):
        out += rank_indices(span.start, span.size, micro_batch=micro_batch, world_size=world_size, rank=rank)
    return out


def _runs(spans: list[StepSpan]) -> list[tuple[int, int]]:
    """The spans merged into contiguous [start, stop) sample ranges."""
    out: list[tuple[int, int]] = []
    for s in spans:
        if out and out[-1][1] == s.start:
            out[-1] = (out[-1][0], s.start + s.size)
        else:
            out.append((s.start, s.start + s.size))
    return out


def count_runs(mixture: Mixture, runs: list[tuple[int, int]]) -> np.ndarray:
    """Samples per source over [start, stop) sample ranges (in mixture.names order). Up to EXACT_LIMIT
    samples every index is resolved, as the trainer resolves them (a step's ranks together read exactly
    its range, rank_indices only orders it); past that, the sampler's closed form."""
    counts = np.zeros(len(mixture.names), dtype=np.int64)
    exact = sum(b - a for a, b in runs) <= EXACT_LIMIT
    for a, b in runs:
        if not exact:
            counts += mixture.stage_counts(b).sum(axis=0) - mixture.stage_counts(a).sum(axis=0)
            continue
        for lo in range(a, b, RESOLVE_CHUNK):
            drawn = mixture.source_counts(np.arange(lo, min(b, lo + RESOLVE_CHUNK)))
            counts += np.array([drawn[n] for n in mixture.names])
    return counts


def expected_shares(mixture: Mixture, runs: list[tuple[int, int]]) -> np.ndarray:
    """The configured share of each source over the sample ranges: each stage's weights, by its samples in them."""
    ends = np.append(mixture.stage_starts[1:], np.iinfo(np.int64).max)
    mass = np.zeros(len(mixture.names))
    for a, b in runs:
        for s, w in enumerate(mixture.stage_weights):
            overlap = max(0, min(b, int(ends[s])) - max(a, int(mixture.stage_starts[s])))
            mass += overlap * w
    return mass / max(mass.sum(), 1)


def _shown(
    mixture: Mixture, spans: list[StepSpan], n: int, tokenizer: Any, *, micro_batch: int, world_size: int
) -> list[dict[str, Any]]:
    """n samples spread evenly over the steps (the first included), decoded."""
    pairs = [
        (span.step, g) for span in spans for g in step_indices(span, micro_batch=micro_batch, world_size=world_size)
    ]
    picks = sorted({int(i) for i in np.linspace(0, len(pairs) - 1, num=min(n, len(pairs)))}) if n > 0 else []
    out = []
    for i in picks:
        step, g = pairs[i]
        src, start = mixture.resolve([g])
        tokens = mixture.batch([g])[0, :-1].tolist()  # the model's input; the last token is only a target
        out.append(
            {
                "index": g,
                "step": step,
                "source": mixture.names[int(src[0])],
                "offset": int(start[0]),
                "text": tokenizer.decode(tokens),
            }
        )
    return out


PROGRESS_STEPS = 5_000_000
"""A walk through a run's skipped ranges (step by step, as the trainer took them) says how far it is after
this many steps: about 10 s on this project's CPUs."""


def _check_range(cfg: Config, first: int, stop: int) -> None:
    """A run stops at train.max_steps, so a step past it trains on nothing; say so rather than walk there."""
    last = cfg.train.max_steps
    if stop - 1 > last:
        raise UserError(
            f"--steps {first}:{stop} goes past the run's last step, train.max_steps={last:,}; ask about steps up "
            f"to it (--steps {min(first, last)}:{last + 1}), or set train.max_steps to ask about a longer run"
        )


def _progress(step: int, stop: int) -> None:
    print(f"scalegpt: inspect: walked to step {step:,} of {stop - 1:,}", file=sys.stderr, flush=True)


def _sample_runs(schedule: Schedule, first: int, stop: int, skips: SkipLog | None) -> list[tuple[int, int]]:
    """The samples of steps first..stop-1 as contiguous [start, stop) ranges. Without skipped samples that is
    one range, from the schedule's totals (seconds for a billion steps); with them, the trainer's walk."""
    if skips is None:
        return [(schedule.totals(first - 1).samples, schedule.totals(stop - 1).samples)]
    return _runs(step_spans(schedule, first, stop, skips.advance, progress=_progress, every=PROGRESS_STEPS))


def _spans(schedule: Schedule, target: Target, first: int, stop: int) -> list[StepSpan]:
    skips = target.skips
    return step_spans(schedule, first, stop, skips.advance if skips is not None else None)


def _picked_spans(schedule: Schedule, target: Target, first: int, stop: int, n: int, samples: int) -> list[StepSpan]:
    """The steps `--show` decodes from: every step of a range of up to EXACT_LIMIT samples (or one with
    skipped samples, which only a walk finds), else n steps spread over it (the first included), each
    found through the schedule's totals."""
    if samples <= EXACT_LIMIT or target.skips is not None:
        return _spans(schedule, target, first, stop)
    picks = sorted({int(k) for k in np.linspace(first, stop - 1, num=n)})
    return [_spans(schedule, target, k, k + 1)[0] for k in picks]


def inspect_steps(target: Target, first: int, stop: int, *, world_size: int, show: int) -> dict[str, Any]:
    """The report: per-source counts and shares over steps first..stop-1, and `show` decoded samples."""
    cfg = target.cfg
    _check_range(cfg, first, stop)
    tok_file = (target.run_dir or Path(cfg.data.dir)) / TOKENIZER
    tokenizer = load_tokenizer(tok_file) if tok_file.is_file() else None
    expect = tokenizer_hash(tokenizer) if tokenizer is not None and target.run_dir is not None else None
    mixture = Mixture.for_config(cfg, tokenizer_hash=expect)
    schedule = Schedule.from_config(cfg, world_size=world_size)
    runs = _sample_runs(schedule, first, stop, target.skips)
    micro = cfg.train.micro_batch
    counts = count_runs(mixture, runs)
    total = int(counts.sum())
    expected = expected_shares(mixture, runs)
    sources = {
        name: {"count": int(counts[i]), "share": counts[i] / max(total, 1), "configured": float(expected[i])}
        for i, name in enumerate(mixture.names)
    }
    report: dict[str, Any] = {
        "target": str(target.run_dir or cfg.run.dir),
        "steps": [first, stop],
        "world_size": world_size,
        "samples": total,
        "tokens": total * cfg.model.n_ctx,
        "sample_ranges": [list(r) for r in runs],
        "skipped": [list(r) for r in target.skipped if r[0] < runs[-1][1]],
        "sources": sources,
    }
    if show:
        if tokenizer is None:
            raise UserError(f"--show needs {tok_file} to decode the samples; run `scalegpt prepare` first")
        picked = _picked_spans(schedule, target, first, stop, show, total)
        report["shown"] = _shown(mixture, picked, show, tokenizer, micro_batch=micro, world_size=world_size)
    report["mixture"] = describe(mixture, run_totals(cfg, world_size).samples)
    return report


def format_report(report: dict[str, Any]) -> str:
    first, stop = report["steps"]
    ranges = ", ".join(f"{a:,}..{b - 1:,}" for a, b in report["sample_ranges"])
    lines = [
        f"{report['target']}: steps {first:,} to {stop - 1:,} train on {report['samples']:,} samples "
        f"({report['tokens']:,} tokens): samples {ranges}",
    ]
    if report["skipped"]:
        lines.append("skipped by the run: " + ", ".join(f"{a:,}..{b - 1:,}" for a, b in report["skipped"]))
    width = max(len("source"), *(len(n) for n in report["sources"]))
    lines.append(f"{'source'.ljust(width)}  {'samples':>12}  {'share':>8}  {'configured':>10}")
    for name, s in report["sources"].items():
        lines.append(
            f"{name.ljust(width)}  {s['count']:>12,}  {100 * s['share']:>7.2f}%  {100 * s['configured']:>9.2f}%"
        )
    for s in report.get("shown", []):
        lines.append(f"\n--- sample {s['index']:,} (step {s['step']:,}, {s['source']}, token {s['offset']:,}) ---")
        lines.append(s["text"])
    lines += ["", "the whole run as configured:", report["mixture"]]
    return "\n".join(lines)


def inspect_curation(cfg: Config, show: int, source: str | None) -> str:
    """What `scalegpt prepare` did to each curated source of cfg's data (train/data/curation_report.py): the
    report it printed, and up to `show` of the documents each step dropped, with why."""
    data_dir = Path(cfg.data.dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise UserError(f"{data_dir} has no prepared data; run `scalegpt prepare` on this config first")
    entries = manifest["sources"]
    names = [e["name"] for e in entries]
    if source is not None and source not in names:
        raise UserError(f"--source {source!r} is not a source of {data_dir}; its sources are {', '.join(names)}")
    chosen = [e for e in entries if source is None or e["name"] == source]
    lines = report_lines(chosen)
    if not lines:
        return f"{data_dir}: no source was curated (no `curation:` settings when it was prepared)"
    return "\n".join([f"{data_dir}:", *lines, *dropped_lines(data_dir, chosen, show)])


def inspect_command(args: argparse.Namespace) -> int:
    """Entry point of `scalegpt inspect` (parser in launch/cli.py)."""
    show = args.show if args.show is not None else (5 if args.curation else 0)
    if show < 0:
        raise UserError(f"--show must be 0 or more, got {show}")
    if args.curation == (args.steps is not None):
        raise UserError("inspect takes --steps A:B (what those steps train on) or --curation (what prepare dropped)")
    if args.curation:
        print(inspect_curation(open_target(args.config, list(args.overrides)).cfg, show, args.source))
        return 0
    first, stop = parse_steps(args.steps)
    if args.json_out:  # found now, not after the work
        check_writable_file(args.json_out, "--json")
    target = open_target(args.config, list(args.overrides))
    report = inspect_steps(target, first, stop, world_size=_world_size(target, args.world_size), show=show)
    print(format_report(report))
    if args.json_out:
        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 0
