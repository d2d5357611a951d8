"""The smoke model (configs/smoke.yaml, trained by the shared `smoke_run` fixture) through `scalegpt eval`
and `scalegpt plot`: eval's validation loss is the trainer's, and the plot shows the run's epochs. Whether a
model trained on the same corpus learns arithmetic is tests/test_arithmetic_e2e.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.launch.plot import plot_run
from scalegpt.train.config.schema import read_config_file
from scalegpt.train.data.mixture import Mixture


@pytest.mark.slow
def test_eval_validation_is_the_trainers(smoke_run: Path, tmp_path: Path) -> None:
    """The same 32 windows per source as the trainer's last evaluation (micro_batch 8 x eval.batches 4),
    read by the checkpoint saved right after it: the same loss and bits per byte."""
    out = tmp_path / "eval.json"
    argv = ["eval", str(smoke_run), "--tasks", "2D+", "--shots", "0", "--num-examples", "1"]
    assert main([*argv, "--batch-size", "32", "--val-batches", "1", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    last = {}
    for line in (smoke_run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            last = record
    assert last["step"] == report["step"] == 200
    metrics = report["validation"]["metrics"]
    assert set(metrics) == {"arithmetic", "scramble", "prose", "mixture"}
    for name, m in metrics.items():
        key = "" if name == "mixture" else f"/{name}"
        assert m["loss"] == pytest.approx(last[f"val_loss{key}"], rel=1e-4)
        assert m["bpb"] == pytest.approx(last[f"val_bpb{key}"], rel=1e-4)
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


@pytest.mark.slow
def test_plot_of_the_smoke_run(smoke_run: Path, tmp_path: Path) -> None:
    fig, notes = plot_run(smoke_run)
    assert notes == []
    epochs = {line.get_label(): line for line in fig.get_axes()[-1].get_lines()}
    cfg = read_config_file(smoke_run / "config.yaml")
    used = Mixture(cfg.data.dir, cfg.model.n_ctx, cfg.run.seed).consumed(200 * 16)
    assert set(epochs) == set(used) == {"arithmetic", "scramble", "prose"}
    for name, line in epochs.items():
        assert line.get_ydata()[-1] == pytest.approx(used[name]["epochs"])
    assert main(["plot", str(smoke_run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 20_000
