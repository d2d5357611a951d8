"""`scalegpt ladder`: the power-law fits recover known exponents; a two-rung ladder with a tiny budget trains
through the real command into ordinary run directories, skips finished rungs, resumes an interrupted rung
from its checkpoint exactly, and stops on SIGTERM; --slurm submits once per rung; bad sizes, axes and
ladder directories are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scalegpt.launch.cli import main
from scalegpt.launch.ladder import CAVEAT, GroupFit, Outcome, RungInfo, SizeRule, default_sizes, fit_group
from scalegpt.launch.ladder_fit import fit_power_law, fit_power_law_offset
from scalegpt.launch.ladder_plot import ladder_figure
from scalegpt.model.config import ModelConfig
from scalegpt.train.config.schema import from_yaml_text

from conftest import CONFIGS, ROOT
from e2e import SMALL_DATA, SMOKE, fork_run, latest_step, metrics, scalegpt
from helpers import one_error_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two rungs of the smoke model's family (d_head 32): one and two heads, ten steps of 2048 tokens each,
# checkpoints at steps 5 and 10.
TWO_RUNGS = ["--sizes", "32", "64", "--tokens", "20480", "--evals", "2", "--checkpoints", "2"]


def ladder_args(ladder: Path, data: Path, *extra: str) -> list[str]:
    return ["ladder", SMOKE, f"run.dir={ladder}", f"data.dir={data}", *SMALL_DATA, *TWO_RUNGS, *extra]


# -- the fit ---------------------------------------------------------------------------------------------------
def test_the_fit_recovers_a_known_exponent() -> None:
    c = np.geomspace(1e9, 1e13, 6)
    exact = fit_power_law(c, 5.0 * c**-0.08)
    assert exact.b == pytest.approx(0.08, rel=1e-9) and exact.a == pytest.approx(5.0, rel=1e-6)
    assert exact.r2 == pytest.approx(1.0) and exact.b_err == pytest.approx(0.0, abs=1e-9)

    noisy = 5.0 * c**-0.08 * np.exp(np.random.default_rng(0).normal(0.0, 0.01, c.size))
    fit = fit_power_law(c, noisy)
    assert abs(fit.b - 0.08) < 3 * fit.b_err and 0 < fit.b_err < 0.01 and 0.9 < fit.r2 < 1.0

    floor = fit_power_law_offset(c, 40.0 * c**-0.3 + 1.7)  # an irreducible loss of 1.7
    assert (floor.b, floor.c) == (pytest.approx(0.3, rel=1e-6), pytest.approx(1.7, rel=1e-6))
    assert floor.a == pytest.approx(40.0, rel=1e-5) and floor.r2 == pytest.approx(1.0)
    assert fit_power_law(c, 40.0 * c**-0.3 + 1.7).r2 < floor.r2  # the plain form cannot bend to the floor

    assert fit_power_law(c[:2], noisy[:2]).b_err is None  # two points: a line, but no error for it
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_power_law_offset(c[:3], noisy[:3])


def _outcome(name: str, params: int, loss: float, axis: str | None = None) -> Outcome:
    info = RungInfo(name, axis, name, 1, 32, 1, params, params, 6.0 * params, 10, 1000, 1e-3)
    curve = [(100, loss * 1.5), (500, loss * 1.1), (1000, loss)]
    return Outcome(info, "done", 10, loss, loss / 1.4, curve)


def test_fit_groups_and_figure_give_one_frontier_per_axis_value() -> None:
    outcomes = [
        _outcome(f"d{i}", n, 9.0 * n**-0.1 * shift, axis)
        for axis, shift in (("model.n_ctx=64", 1.0), ("model.n_ctx=128", 0.9))
        for i, n in enumerate((1e4, 3e4, 1e5, 3e5))
    ]
    groups = [fit_group(axis, [o for o in outcomes if o.info.axis_value == axis]) for axis in ("model.n_ctx=64",)]
    assert groups[0].loss_vs_params[0].b == pytest.approx(0.1) and groups[0].loss_falls_with_size
    assert [f.form for f in groups[0].loss_vs_compute] == ["power", "power+offset"]  # four points: both forms
    both = [
        fit_group(a, [o for o in outcomes if o.info.axis_value == a]) for a in ("model.n_ctx=64", "model.n_ctx=128")
    ]
    fig = ladder_figure(outcomes, both, title="t", caveat=CAVEAT)
    compute = fig.get_axes()[0]
    frontiers = [line.get_label() for line in compute.get_lines() if line.get_label().startswith("model.n_ctx")]
    assert sum(label.startswith("model.n_ctx=64:") for label in frontiers) >= 1
    assert sum(label.startswith("model.n_ctx=128:") for label in frontiers) >= 1
    assert compute.get_xscale() == compute.get_yscale() == "log"


def test_a_ladder_whose_loss_rises_with_size_says_so() -> None:
    group: GroupFit = fit_group(None, [_outcome("a", 1000, 3.0), _outcome("b", 2000, 3.1)])
    assert not group.loss_falls_with_size


def test_the_parser_module_is_light() -> None:
    """Every `scalegpt` command builds the ladder's parser, so its module must not import the heavy ones."""
    heavy = "{'torch', 'numpy', 'omegaconf', 'matplotlib', 'deepspeed'}"
    code = f"import sys; import scalegpt.launch.ladder; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- the size rule -----------------------------------------------------------------------------------------------
def test_the_size_rule_and_its_default_sizes() -> None:
    rule = SizeRule(aspect=64, d_head=32)
    assert [rule.shape(s).name for s in ("32", "128", "192", "3x96")] == ["L1-d32", "L2-d128", "L3-d192", "L3-d96"]
    assert rule.shape("128").n_head == 4 and rule.shape("768").n_layer == 12  # GPT-3 Small's shape
    assert default_sizes(ModelConfig(d_model=128, n_head=4), rule) == ["32", "64", "96", "128"]
    assert default_sizes(ModelConfig(d_model=128, n_head=8), SizeRule(64, 16)) == ["32", "48", "64", "96", "128"]


def test_the_cpu_default_plans_five_rungs_and_overrides_reach_every_rung(capsys: pytest.CaptureFixture[str]) -> None:
    cpu = str(CONFIGS / "ladder-cpu.yaml")
    assert (
        main(["ladder", cpu, "optim.lr=1e-3", "run.dir=/nonexistent/x", "--launch", "--procs", "1", "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "size rule (GPT-3 Table 2.1 scaled down)" in out and "departures from Table 2.1" in out
    rungs = [line.split()[0] for line in out.splitlines() if line.startswith("L")]
    assert rungs == ["L1-d32", "L1-d48", "L1-d64", "L2-d96", "L2-d128"]
    commands = [line for line in out.splitlines() if "--module scalegpt train" in line]
    assert len(commands) == 5 and all("optim.lr=" in c for c in commands)
    lrs = [float(c.split("optim.lr=")[-1].split()[0]) for c in commands]
    assert lrs[-1] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True)  # the top rung takes the config's
    assert not Path("/nonexistent/x").exists()


def test_an_axis_runs_the_ladder_once_per_value_at_equal_budgets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ladder = tmp_path / "ctx"
    args = ["--axis", "model.n_ctx=64,128", "--launch", "--procs", "1", "--dry-run"]
    assert main(["ladder", SMOKE, "--sizes", "32", "64", f"run.dir={ladder}", *args]) == 0  # an override after sizes
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("model.n_ctx=")]
    assert [(r[0], r[1]) for r in rows] == [
        ("model.n_ctx=64", "L1-d32"),
        ("model.n_ctx=64", "L1-d64"),
        ("model.n_ctx=128", "L1-d32"),
        ("model.n_ctx=128", "L1-d64"),
    ]
    tokens = {(r[0], r[1]): int(r[7].replace(",", "")) for r in rows}
    steps = {(r[0], r[1]): int(r[8]) for r in rows}
    for size in ("L1-d32", "L1-d64"):  # the same tokens per parameter: half the context, twice the steps
        assert tokens["model.n_ctx=64", size] == tokens["model.n_ctx=128", size]
        assert steps["model.n_ctx=64", size] == 2 * steps["model.n_ctx=128", size]
    commands = [line for line in out.splitlines() if "--module scalegpt train" in line]
    assert len(commands) == 4
    assert f"run.dir={ladder}/model.n_ctx=64/L1-d32" in commands[0] and "model.n_ctx=64 " in commands[0]
    assert not ladder.exists()


# -- clear errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--sizes", "100"], "size 100 does not fit n_head: d_model=100 is not a multiple of the head width"),
        (["--axis", "model.bogus=1,2"], "--axis model.bogus=1: model.bogus in the command line: no such key"),
        (["--axis", "model.d_model=64,128"], "the ladder sets model.d_model for every rung itself"),
        (["--axis", "model.n_ctx"], "write KEY=V1,V2"),
        (["--tokens", "-5"], "--tokens must be a positive number"),
        (["--launch", "--procs", "1", "--bogus"], "--launch: unrecognized arguments: --bogus"),
    ],
)
def test_bad_ladders_are_one_error_line_and_create_nothing(
    args: list[str], expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["ladder", SMOKE, f"run.dir={tmp_path / 'ladder'}", *args])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and expect in line
    assert not (tmp_path / "ladder").exists()


def test_plot_of_an_empty_ladder_directory_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    assert f"{empty} is empty: it has no metrics.jsonl" in one_error_line(capsys.readouterr().err)

    planned = tmp_path / "planned"  # a ladder that has planned its rungs but finished none
    planned.mkdir()
    info = RungInfo("L1-d32", None, "L1-d32", 1, 32, 1, 100, 100, 600.0, 10, 1000, 1e-3)
    (planned / "ladder.json").write_text(json.dumps({"config": "c.yaml", "rungs": [vars(info)]}))
    assert main(["plot", str(planned)]) == 2
    assert "has no finished rung yet (1 planned)" in one_error_line(capsys.readouterr().err)
    assert not (planned / "ladder.png").exists()


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rungs(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    ladder = tmp_path_factory.mktemp("ladder") / "two"
    done = scalegpt(*ladder_args(ladder, prepared), timeout=600)
    return ladder, done.stdout


@pytest.mark.slow
def test_a_two_rung_ladder_trains_ordinary_runs_and_fits_them(two_rungs: tuple[Path, str]) -> None:
    ladder, out = two_rungs
    summary = json.loads((ladder / "ladder.json").read_text())
    assert [r["name"] for r in summary["rungs"]] == ["L1-d32", "L1-d64"]
    for rung in summary["rungs"]:
        run = ladder / rung["dir"]
        assert rung["status"] == "done" and latest_step(run) == rung["steps"] == 10
        assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
        final = [m for m in metrics(run) if m["step"] == 10 and m.get("val_loss") is not None]
        assert rung["val_loss"] == final[-1]["val_loss"] and rung["tokens"] == final[-1]["tokens"] == 20480
        model = from_yaml_text((run / "config.yaml").read_text()).model
        assert (model.n_layer, model.d_model, model.n_head) == (rung["n_layer"], rung["d_model"], rung["n_head"])
    (fit,) = summary["fits"]
    assert fit["points"] == 2 and [f["form"] for f in fit["loss_vs_compute"]] == ["power"]
    assert fit["loss_vs_compute"][0]["b_err"] is None  # two points leave no degree of freedom
    assert (ladder / "ladder.png").read_bytes().startswith(PNG_MAGIC)
    assert "departures from Table 2.1" in out and "not the GPT-3 paper's" in out


@pytest.mark.slow
def test_finished_rungs_are_not_trained_again(two_rungs: tuple[Path, str], prepared: Path) -> None:
    ladder, _ = two_rungs
    before = {p: p.stat().st_mtime_ns for p in ladder.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    logs = {p: p.read_bytes() for p in ladder.glob("*/metrics.jsonl")}
    out = scalegpt(*ladder_args(ladder, prepared)).stdout
    assert out.count("finished earlier, not trained again") == 2 and ": training" not in out
    assert {p: p.read_bytes() for p in ladder.glob("*/metrics.jsonl")} == logs
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_an_interrupted_ladder_resumes_its_rung_from_the_checkpoint(
    two_rungs: tuple[Path, str], prepared: Path, tmp_path: Path
) -> None:
    """The state a stop leaves: the first rung done, the second with a checkpoint at step 5 of 10."""
    ladder, _ = two_rungs
    resumed = tmp_path / "resumed"
    shutil.copytree(ladder / "L1-d32", resumed / "L1-d32")
    fork_run(ladder / "L1-d64", resumed / "L1-d64", 5)
    out = scalegpt(*ladder_args(resumed, prepared)).stdout
    assert (
        "rung 1/2 L1-d32: finished earlier" in out and "rung 2/2 L1-d64: training 10 steps, resuming from step 5" in out
    )
    assert "resumed from" in out
    original, again = (json.loads((d / "ladder.json").read_text())["rungs"] for d in (ladder, resumed))
    assert again[1]["val_loss"] == original[1]["val_loss"]  # bit for bit: the same steps 6-10 on CPU
    assert latest_step(resumed / "L1-d64") == 10


@pytest.mark.slow
def test_sigterm_stops_the_ladder_with_its_rung_saved(prepared: Path, tmp_path: Path) -> None:
    ladder = tmp_path / "stopped"
    args = ladder_args(ladder, prepared, "--sizes", "32", "--tokens", "1024000", "--checkpoints", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalegpt", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = ladder / "L1-d32" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    step = latest_step(ladder / "L1-d32")
    assert step is not None and 0 < step < 500 and f"stopped at step {step}; run the same command again" in out
    summary = json.loads((ladder / "ladder.json").read_text())
    assert summary["rungs"][0]["status"] == "partial" and not (ladder / "ladder.png").exists()


@pytest.mark.slow
def test_slurm_submits_each_rung_once_and_lists_them(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" >>"${0%/*}/sbatch.args"\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.defpath}")
    ladder = tmp_path / "slurm"
    args = ladder_args(ladder, prepared, "--launch", "--slurm", "--gpus-per-node", "2", "--time", "1:00:00")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("submitted SLURM job 4242") == 2 and "2 rung(s) pending: L1-d32, L1-d64" in out
    assert [line.split()[-1] for line in (bin_dir / "sbatch.args").read_text().splitlines()] == [
        str((ladder / name / "sbatch.sh").resolve()) for name in ("L1-d32", "L1-d64")
    ]
    assert main(args) == 0  # again: nothing is submitted twice, the pending rungs are listed
    out = capsys.readouterr().out
    assert out.count("submitted earlier") == 2 and "2 rung(s) pending" in out
    assert len((bin_dir / "sbatch.args").read_text().splitlines()) == 2
