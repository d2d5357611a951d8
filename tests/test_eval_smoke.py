"""The smoke model (configs/smoke.yaml, trained by the shared `smoke_run` fixture) through `scalegpt eval`
and `scalegpt plot`: eval's validation loss is the trainer's, the plot shows the run's epochs, and the
model is tested against chance on arithmetic.

Chance. Free-form tasks: the majority baseline, the accuracy of always giving the most frequent answer
(2D+: 90/8100 = 1.1%). Multiple choice: the right answer is offered among the answers of three other
problems of the same task, in random order, so a model that does not read the question scores exactly
25%. "Above chance" is a one-sided binomial test at family-wise 1% (Bonferroni over the five tasks).

The 200-step smoke model (0.5M parameters, 0.4M tokens, 40% of them arithmetic) is at chance on all of
them, multiple choice included (23-26% at K=0 over 1000 problems each), so that test is a strict xfail:
it starts failing, as a reminder to drop the marker, once the smoke run learns enough. Measured on the
same config: at 500 steps still chance; at 1000 steps (train.max_steps=1000 schedule.decay_tokens=2048000,
2M tokens, ~5 minutes on two CPU processes) mc-2D+ 43%, mc-3D+ 39%, mc-2Dx 37% at K=0 (300 problems,
p < 1e-4 each); exact-match 2D+ needs ~2000 steps to clear its 1.1% baseline clearly (8%)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.launch.plot import plot_run
from scalegpt.train.data.mixture import Mixture
from scalegpt.train.inference import read_config

MC_ARITHMETIC = ["mc-2D+", "mc-2D-", "mc-3D+", "mc-3D-", "mc-2Dx"]


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
@pytest.mark.xfail(
    strict=True,
    reason="the 200-step smoke model is at chance on every arithmetic task, multiple choice included; it needs "
    "~1000 steps (see this module's docstring)",
)
def test_smoke_model_beats_chance_on_arithmetic(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", str(smoke_run), "--tasks", *MC_ARITHMETIC, "--shots", "0", "--num-examples", "400"]
    assert main([*argv, "--val-batches", "0", "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    cells = json.loads(out.read_text())["fewshot"]
    assert len(cells) == 5 and all(c["chance"] == 0.25 and c["total"] == 400 for c in cells)
    best = min(cells, key=lambda c: c["p_value"])
    assert best["p_value"] < 0.01 / len(cells) and best["accuracy"] > 0.25, f"no task above chance:\n{table}"


@pytest.mark.slow
def test_plot_of_the_smoke_run(smoke_run: Path, tmp_path: Path) -> None:
    fig, notes = plot_run(smoke_run)
    assert notes == []
    epochs = {line.get_label(): line for line in fig.get_axes()[-1].get_lines()}
    cfg = read_config(smoke_run / "config.yaml")
    used = Mixture(cfg.data.dir, cfg.model.n_ctx, cfg.run.seed).consumed(200 * 16)
    assert set(epochs) == set(used) == {"arithmetic", "scramble", "prose"}
    for name, line in epochs.items():
        assert line.get_ydata()[-1] == pytest.approx(used[name]["epochs"])
    assert main(["plot", str(smoke_run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 20_000
