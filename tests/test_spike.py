"""Spike recovery and fire drills: train.on_spike (stop | skip | rewind), train.inject_fault (nan | spike |
crash | hang) and the step watchdog, each through a real `scalegpt train`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scalegpt.train.checkpoint import checkpoint_dir
from scalegpt.train.config.loading import load_config
from scalegpt.train.errors import UserError
from scalegpt.train.recovery import Fault, Skip, SkipLog, SpikeDetector, parse_fault

from conftest import ROOT
from e2e import SMALL_DATA, SMOKE, latest_step, losses, metrics, scalegpt, train
from helpers import one_error_line

FEW = ["eval.every=0", "log.every=1"]
# The drill of the README: a NaN at step 4 rewinds to the checkpoint of step 2 and skips steps 3-4's samples.
DRILL = [*FEW, "train.max_steps=6", "checkpoint.every=2", "train.inject_fault=nan@4", "train.on_spike=rewind"]


def test_the_detector_judges_against_the_running_median() -> None:
    d = SpikeDetector(window=3, loss_ratio=1.5, grad_ratio=10.0, check_grad=True)
    history: list[list[float]] = []
    assert [d.check(history, loss, 1.0) for loss in (5.0, 4.0, 3.0)] == [None, None, None]
    assert d.check(history, 6.1, 1.0) == "loss spiked to 6.1 (1.5x the median 4)"
    assert d.check(history, 3.0, 11.0) is not None and "gradient norm spiked" in str(d.check(history, 3.0, 11.0))
    assert d.check(history, 3.0, math.inf) == "gradient norm became inf"
    assert d.check([], math.nan, 1.0) == "loss became nan"  # non-finite counts before the window is full
    assert len(history) == 3 and history[-1] == [3.0, 1.0]  # spikes never join the window


def test_skipped_ranges_chain_and_lower_the_lr(tmp_path: Path) -> None:
    log = SkipLog(tmp_path)
    log.add(Skip(2, 4, 32, 64, 0.5, 5), is_main=True)
    log.add(Skip(2, 5, 64, 80, 1.0, 2), is_main=True)  # a second rewind to the same checkpoint
    again = SkipLog(tmp_path)  # what a resume reads
    assert again.advance(32) == 80 and again.advance(31) == 31
    assert [again.lr_factor(s) for s in (2, 3, 5, 6)] == [1.0, 0.5, 0.5, 1.0]


def test_fault_specs() -> None:
    assert parse_fault("nan@50") == Fault("nan", 50)
    assert parse_fault("boom@5") is None and parse_fault("nan@0") is None and parse_fault("nan") is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.on_spike=retry", "train.on_spike in the command line: must be 'stop', 'skip' or 'rewind'"),
        ("train.inject_fault=nan", "train.inject_fault in the command line: must be nan@STEP"),
        ("train.inject_fault=hang@3", "hang@STEP needs the watchdog: set train.step_timeout_s"),
        ("train.spike_loss_ratio=0.5", "train.spike_loss_ratio in the command line: must be 0 (off) or above 1"),
    ],
)
def test_bad_recovery_settings_are_named_by_the_loader(override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(SMOKE, [override])
    assert message in str(err.value)


def test_a_bad_setting_ends_the_real_command_in_one_line_and_exit_2() -> None:
    """The loader's error as a user meets it: `scalegpt train` in its own process prints the one line."""
    proc = scalegpt("train", SMOKE, "train.on_spike=retry", "--dry-run", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train.on_spike in the command line: must be 'stop', 'skip' or 'rewind'" in one_error_line(proc.stderr)


@pytest.fixture(scope="module")
def drill(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("drill")
    proc = train(run, prepared, *DRILL)
    assert "loss spike: loss became nan at step 4; rewound to step 2 and skipping samples 32-63" in proc.stdout
    return run


@pytest.mark.slow
def test_a_nan_drill_rewinds_and_finishes(drill: Path) -> None:
    rows = metrics(drill)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the abandoned steps 3-4 are gone, none twice
    assert rows[1]["event"] == "rewind" and rows[1]["rewind"]["spike_step"] == 4
    assert rows[1]["rewind"]["skipped_samples"] == [32, 64] and rows[1]["loss"] is not None
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((drill / "faults.json").read_text()) == ["nan@4"]
    skipped = json.loads((drill / "skipped.json").read_text())
    assert [(s["from_step"], s["start"], s["end"]) for s in skipped] == [(2, 32, 64)]
    assert rows[-1]["tokens"] == 6 * 16 * 128  # skipped samples are not trained tokens
    assert latest_step(drill) == 6


@pytest.mark.slow
def test_the_drill_resumed_after_kill_9_reproduces_its_losses(drill: Path, prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scalegpt", "train", SMOKE, f"run.dir={run}", f"data.dir={prepared}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    proc = subprocess.Popen([*cmd, *SMALL_DATA, *DRILL], cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "skipped.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # right after the rewind, before any new checkpoint
    proc.wait()
    assert (run / "skipped.json").is_file() and latest_step(run) in (2, 4)
    resumed = train(run, prepared, *DRILL)
    assert "fire drill" not in resumed.stdout  # the fault is recorded as fired: it does not fire again
    assert losses(run) == losses(drill)  # every step, bit for bit
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_on_spike_stop_ends_the_run_and_skip_drops_only_that_update(prepared: Path, tmp_path: Path) -> None:
    spike = [*FEW, "train.spike_window=2", "train.inject_fault=spike@3"]
    proc = train(tmp_path / "stop", prepared, *spike, "train.max_steps=3", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("scalegpt: error: loss spiked to") and "at step 3" in last
    assert latest_step(tmp_path / "stop") is None  # nothing saved for it

    train(tmp_path / "skip", prepared, *spike, "train.max_steps=4", "train.on_spike=skip")
    rows = metrics(tmp_path / "skip")
    assert rows[2]["event"] == "skip" and "loss spiked" in rows[2]["reason"]
    assert all("event" not in r for r in rows[:2] + rows[3:])
    states = torch.load(checkpoint_dir(tmp_path / "skip", 4) / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["skipped_steps"] == 1 and states["global_steps"] == 4  # DeepSpeed dropped that one update
    stopped = losses(tmp_path / "stop")
    assert [losses(tmp_path / "skip")[s] for s in (1, 2)] == [stopped[1], stopped[2]]  # the same run before it


@pytest.mark.slow
@pytest.mark.slow
def test_a_hang_ends_in_an_error_from_the_watchdog(prepared: Path, tmp_path: Path) -> None:
    # The timeout is far above a healthy step of this model, also on a loaded machine: with 3 s, a slow
    # first step was itself reported as a hang.
    overrides = [*FEW, "train.max_steps=3", "train.inject_fault=hang@2", "train.step_timeout_s=20"]
    proc = train(tmp_path, prepared, *overrides, check=False)
    assert proc.returncode == 3
    assert "scalegpt: error: step 2 made no progress for 20 s (train.step_timeout_s)" in proc.stderr


@pytest.mark.slow
def test_a_crash_drill_fires_once_and_the_run_resumes(prepared: Path, tmp_path: Path) -> None:
    overrides = [*FEW, "train.max_steps=3", "checkpoint.every=1", "train.inject_fault=crash@2"]
    proc = train(tmp_path, prepared, *overrides, check=False)
    assert proc.returncode == -signal.SIGKILL and latest_step(tmp_path) == 1
    resumed = train(tmp_path, prepared, *overrides)
    assert "at step 1 " in resumed.stdout and latest_step(tmp_path) == 3
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]


def test_z_loss_matches_its_formula_in_value_and_gradient() -> None:
    from scalegpt.model.loss import chunked_cross_entropy

    torch.manual_seed(0)
    x, w = torch.randn(12, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (12,))
    ours = chunked_cross_entropy(x, w, targets, 1e-2)
    logits = x @ w.t()
    reference = torch.nn.functional.cross_entropy(logits, targets) + 1e-2 * logits.logsumexp(-1).square().mean()
    gx, gw = torch.autograd.grad(ours, (x, w))
    rx, rw = torch.autograd.grad(reference, (x, w))
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_optim_z_loss_reaches_the_model() -> None:
    from scalegpt.model import build_model
    from scalegpt.train.config.loading import load_config
    from scalegpt.train.engine import configure_model

    cfg = load_config(SMOKE, ["optim.z_loss=1e-4"])
    model = build_model(cfg.model, seed=0)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 17))
    plain = model(idx[:, :-1], idx[:, 1:])[1]
    configure_model(cfg, model)
    with_z = model(idx[:, :-1], idx[:, 1:])[1]
    assert model.z_loss == 1e-4 and with_z > plain


@pytest.mark.slow
def test_spike_keys_set_on_the_command_line_take_effect(drill: Path, prepared: Path, tmp_path: Path) -> None:
    """spike_lr_factor / spike_lr_steps lower the LR after a rewind; spike_max_rewinds=0 gives up at once;
    spike_grad_ratio alone (the loss test off) still catches a spike through the gradient norm."""
    lowered = tmp_path / "lowered"
    train(lowered, prepared, *DRILL, "train.spike_lr_factor=0.5", "train.spike_lr_steps=2")
    plain, low = metrics(drill), metrics(lowered)
    assert [low[i]["lr"] for i in (2, 3)] == [plain[i]["lr"] * 0.5 for i in (2, 3)]  # steps 3-4, after the rewind
    assert low[4]["lr"] == plain[4]["lr"] and low[0]["lr"] == plain[0]["lr"]

    proc = train(tmp_path / "give-up", prepared, *DRILL, "train.spike_max_rewinds=0", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "gave up after 0 rewind(s) (train.spike_max_rewinds=0)" in last

    grad = [*FEW, "train.spike_window=2", "train.inject_fault=spike@3", "train.max_steps=3", "train.spike_loss_ratio=0"]
    proc = train(tmp_path / "grad", prepared, *grad, "train.spike_grad_ratio=50", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "gradient norm spiked" in last and "at step 3" in last
