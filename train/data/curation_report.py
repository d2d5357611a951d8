"""The curation report: per source and per step, the documents and bytes that went in, were kept and were
dropped. Each step's counts are in its source's manifest entry (`curation.<step>`); this module reads them
alike for `scalegpt prepare`, which prints the table, and `scalegpt inspect --curation`, which adds the
dropped documents each step recorded and why it dropped them (a score, or the copy that was kept).

Steps count what they receive, so a source's rows chain: dedup's documents in are the quality filter's
kept. Decontamination can split a document into several, so its "kept" may exceed its "in"; its dropped
are the documents it dropped whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEPS = ("quality", "dedup", "decontaminate")
"""The order in which prepare applies the steps to a source (prepare/read.py's curated)."""


@dataclass(frozen=True)
class StepCounts:
    source: str
    step: str
    documents: int
    bytes: int
    kept: int
    """Documents the step passed on."""
    bytes_kept: int
    dropped: int
    """Documents removed whole."""

    @classmethod
    def of(cls, source: str, step: str, row: dict[str, Any]) -> StepCounts:
        if step == "decontaminate":
            kept, dropped = int(row["pieces"]), int(row["dropped"])
        else:
            kept = int(row["kept"])
            dropped = int(row["documents"]) - kept
        return cls(source, step, int(row["documents"]), int(row["bytes"]), kept, int(row["bytes_kept"]), dropped)


def step_counts(entries: Iterable[dict[str, Any]]) -> list[StepCounts]:
    """Every curated source's steps, in the manifest's source order and the order they ran."""
    out = []
    for entry in entries:
        rows = entry.get("curation") or {}
        out += [StepCounts.of(entry["name"], step, rows[step]) for step in STEPS if step in rows]
    return out


def report_lines(entries: Iterable[dict[str, Any]]) -> list[str]:
    """The table prepare prints; empty when no source is curated."""
    counts = step_counts(entries)
    if not counts:
        return []
    width = max(len("source"), *(len(c.source) for c in counts))
    lines = [
        "curation: documents and MB each step received, kept and dropped (`scalegpt inspect CONFIG --curation` "
        "shows dropped documents)",
        f"  {'source'.ljust(width)}  {'step':<13} {'docs in':>10} {'MB in':>9} {'docs kept':>10} {'MB kept':>9} "
        f"{'dropped':>9} {'dropped %':>9}",
    ]
    for c in counts:
        share = 100 * c.dropped / max(c.documents, 1)
        lines.append(
            f"  {c.source.ljust(width)}  {c.step:<13} {c.documents:>10,} {c.bytes / 1e6:>9.2f} {c.kept:>10,} "
            f"{c.bytes_kept / 1e6:>9.2f} {c.dropped:>9,} {share:>8.1f}%"
        )
    return lines


def dropped_documents(data_dir: Path, entry: dict[str, Any], step: str) -> list[dict[str, Any]]:
    """The dropped documents a step recorded for a source (a bounded sample, as each step documents): the
    quality filter keeps them in the manifest row, dedup in a JSON-lines file its row names."""
    row = (entry.get("curation") or {}).get(step) or {}
    if step == "quality":
        return list(row.get("dropped_sample", []))
    if step == "dedup" and row.get("samples"):
        path = data_dir / row["samples"]
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def _excerpt(text: str, n: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 3] + "..."


def why_dropped(step: str, doc: dict[str, Any]) -> str:
    """One line saying why a step dropped a document, from what it recorded."""
    if step == "quality":
        why = f"score {doc['score']:.3f}"
        if doc.get("draw") is not None:
            why += f", its Pareto draw {doc['draw']:.3f} <= 1 - score = {1 - doc['score']:.3f}"
        return why
    if step == "dedup":
        kept = doc.get("kept") or {}
        jac = doc.get("jaccard")
        sim = f", estimated Jaccard {jac:.2f}" if jac is not None else ""
        return (
            f"{doc.get('reason', 'duplicate')} copy{sim} of document {kept.get('hash', '?')} kept in "
            f"{kept.get('source', '?')}: {_excerpt(str(kept.get('excerpt', '')), 100)!r}"
        )
    return "dropped"


def dropped_lines(data_dir: Path, entries: Iterable[dict[str, Any]], show: int, only: str | None = None) -> list[str]:
    """Up to `show` dropped documents per source and step, each with why."""
    lines = []
    for entry in entries:
        if only is not None and entry["name"] != only:
            continue
        for step in STEPS:
            docs = dropped_documents(data_dir, entry, step)[:show]
            if not docs:
                continue
            lines.append(f"\n{entry['name']}, {step}: {len(docs)} of the documents it dropped")
            for doc in docs:
                lines.append(f"  - {why_dropped(step, doc)}")
                lines.append(f"    {_excerpt(str(doc.get('text', doc.get('excerpt', ''))), 200)!r}")
    return lines
