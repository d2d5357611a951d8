"""`scalegpt plot RUN_DIR`: a non-empty PNG with the expected panels, epochs from the prepared data,
and a note instead of the epochs panel when the data are gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.launch.plot import PANELS, plot_run, read_metrics
from scalegpt.train.data.mixture import Mixture

from eval_helpers import BATCH, N_CTX, TinyWorld, metrics_records, tiny_world

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return tiny_world(tmp_path_factory)


def test_plot_command_writes_a_png(world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "curves.png"
    assert main(["plot", str(world.run), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    assert f"wrote {out}" in capsys.readouterr().out
    assert not list(out.parent.glob(".curves.png.*")), "the temporary file was left behind"


def test_panels_and_their_curves(world: TinyWorld) -> None:
    fig, notes = plot_run(world.run)
    assert notes == []
    axes = fig.get_axes()
    assert tuple(ax.get_title() for ax in axes) == PANELS
    by_title = {ax.get_title(): ax for ax in axes}
    labels = {line.get_label() for line in by_title["loss"].get_lines()}
    assert {"train (EMA)", "validation", "val arithmetic", "val prose"} <= labels
    bpb = {line.get_label(): line for line in by_title["bits per byte (validation)"].get_lines()}
    assert list(bpb["mixture"].get_xdata()) == [20, 40, 60]
    lr = by_title["learning rate"].get_lines()[0]
    assert len(lr.get_xdata()) == 60 and max(lr.get_ydata()) == pytest.approx(1e-3)
    epochs = {line.get_label(): line for line in by_title["epochs elapsed per source"].get_lines()}
    assert set(epochs) == {"arithmetic", "prose"}
    mixture = Mixture(world.data, N_CTX, world.config.run.seed)
    expect = mixture.consumed(60 * BATCH)
    for name, line in epochs.items():
        assert line.get_xdata()[-1] == 60
        assert line.get_ydata()[-1] == pytest.approx(expect[name]["epochs"])
        assert list(line.get_ydata()) == sorted(line.get_ydata())  # epochs only grow


def test_missing_data_leaves_a_note(world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    text = (run / "config.yaml").read_text().replace(str(world.data), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(text)
    fig, notes = plot_run(run)
    assert len(notes) == 1 and "epochs panel left empty" in notes[0] and "gone" in notes[0]
    panel = fig.get_axes()[-1]
    assert panel.get_title() == "epochs elapsed per source" and not panel.get_lines()
    assert "no manifest.json" in panel.texts[0].get_text().replace("\n", " ")
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert "scalegpt: note: epochs panel left empty" in capsys.readouterr().err
    # the data dir can be given explicitly
    _, notes = plot_run(run, data_dir=world.data)
    assert notes == []


def test_resumed_runs_and_torn_lines(tmp_path: Path) -> None:
    """A resume logs steps again (the later record wins); a half-written last line is skipped."""
    records = metrics_records(10)
    redo = [dict(r, loss=9.0) for r in records[4:7]]
    lines = [json.dumps(r) for r in [*records[:8], *redo, *records[7:]]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "lo')
    got, bad = read_metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 11)) and bad == 1
    assert [r["loss"] for r in got[4:7]] == [9.0] * 3
    fig, notes = plot_run(tmp_path)
    assert "skipped 1 unreadable line(s)" in notes[0] and "no config.yaml" in notes[1]


def test_plot_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"scalegpt: error: run directory {tmp_path / 'nope'} does not exist"
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no metrics yet" in capsys.readouterr().err
