"""The curation report as a user reads it: the table `scalegpt prepare` prints and `scalegpt inspect --curation`
shows with the documents each step dropped and why, checked against the documents counted by hand and the
scores recomputed from the saved classifier."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_curation_quality import World, crawl_entry, expected, world  # noqa: F401  (world is a fixture)

from scalegpt.launch.cli import main
from scalegpt.train.data.curation_report import StepCounts, report_lines, step_counts

from helpers import one_error_line


def table_row(out: str, source: str, step: str) -> list[str]:
    """The cells of the report's row for source and step, as printed."""
    rows = [line.split() for line in out.splitlines() if re.match(rf"\s+{re.escape(source)}\s+{step}\s", line)]
    assert len(rows) == 1, out
    return rows[0][2:]


def test_prepare_prints_each_steps_counts_as_counted_by_hand(world: World) -> None:  # noqa: F811
    kept, _ = expected(world.data, world.docs, crawl_entry(world.data)["curation"]["quality"]["rule"])
    n_in, n_kept = len(world.docs), int(kept.sum())
    mb_in = sum(len(d.encode()) for d in world.docs) / 1e6
    mb_kept = sum(len(d.encode()) for d, k in zip(world.docs, kept, strict=True) if k) / 1e6
    cells = table_row(world.out, "crawl", "quality")
    assert cells == [
        f"{n_in:,}",
        f"{mb_in:.2f}",
        f"{n_kept:,}",
        f"{mb_kept:.2f}",
        f"{n_in - n_kept:,}",
        f"{100 * (n_in - n_kept) / n_in:.1f}%",
    ]
    assert not any(re.match(r"\s+(books|wiki|junk)\s", line) for line in world.out.splitlines())  # not curated


def test_inspect_curation_shows_dropped_documents_with_their_scores(world: World, capsys) -> None:  # noqa: F811
    kept, scores = expected(world.data, world.docs, crawl_entry(world.data)["curation"]["quality"]["rule"])
    assert main(["inspect", str(world.config), "--curation", "--show", "3"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "crawl", "quality")[2] == f"{int(kept.sum()):,}"
    assert "crawl, quality: 3 of the documents it dropped" in out
    shown = [float(m) for m in re.findall(r"- score ([0-9.]+)", out)]
    first = np.flatnonzero(~kept)[:3]
    assert shown == pytest.approx(scores[first].tolist(), abs=5e-4)  # printed to 3 places
    for i in first:
        assert " ".join(world.docs[i].split())[:60] in out
    draws = [float(m) for m in re.findall(r"Pareto draw ([0-9.]+) <=", out)]
    assert len(draws) == 3 and all(d <= 1 - s + 5e-4 for d, s in zip(draws, scores[first], strict=True))


def test_inspect_curation_bad_input(world: World, tmp_path, capsys) -> None:  # noqa: F811
    assert main(["inspect", str(world.config), "--curation", "--source", "nope"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'nope'" in line and "crawl" in line
    assert main(["inspect", str(world.config)]) == 2  # neither --steps nor --curation
    assert "--curation" in one_error_line(capsys.readouterr().err)
    assert main(["inspect", str(world.config), "--curation", f"data.dir={tmp_path / 'none'}"]) == 2
    assert "run `scalegpt prepare`" in one_error_line(capsys.readouterr().err)


def test_report_chains_steps_and_counts_split_documents() -> None:
    entry = {
        "name": "web",
        "curation": {
            "decontaminate": {"documents": 8, "bytes": 800, "pieces": 9, "bytes_kept": 700, "dropped": 1},
            "quality": {"documents": 10, "bytes": 1000, "kept": 8, "bytes_kept": 800},
        },
    }
    counts = step_counts([entry, {"name": "plain"}])
    assert [c.step for c in counts] == ["quality", "decontaminate"]  # the order prepare runs them
    assert counts[1] == StepCounts("web", "decontaminate", 8, 800, 9, 700, 1)  # a split document counts twice
    assert counts[0].dropped == 2 and report_lines([{"name": "plain"}]) == []
