"""The batch ramp: batch sizes that do not depend on the world size, and optimizer steps that accumulate
exactly their own micro batches while the accumulation changes, through a resume and across process counts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from scalegpt.launch.cli import main
from scalegpt.train.checkpoint import checkpoint_dir
from scalegpt.train.config.loading import load_config
from scalegpt.train.errors import UserError
from scalegpt.train.schedule import Schedule, Totals, run_totals

from conftest import once_per_session
from e2e import SMALL_DATA, SMOKE, fork_run, losses, metrics, train

# Micro batch 2 and a quantum of 4 (2 x 2 processes): the ramp trains 4, 4, 4, 8, 12, 16 sequences, so the
# accumulation changes three times in six steps (2, 2, 2, 4, 6, 8 micro steps on one process).
RAMP = [
    "train.micro_batch=2",
    "train.global_batch=16",
    "schedule.ramp_tokens=3000",
    "schedule.ramp_start_tokens=256",
    "schedule.ramp_quantum=4",
    "train.max_steps=6",
    "checkpoint.every=3",
    "eval.every=0",
    "log.every=1",
]
BATCHES = [4, 4, 4, 8, 12, 16]


def _schedule(world_size: int, *overrides: str) -> Schedule:
    return Schedule.from_config(load_config(SMOKE, [*RAMP, *overrides]), world_size=world_size)


def _batches(schedule: Schedule, steps: int) -> list[int]:
    tokens, out = 0, []
    for _ in range(steps):
        out.append(schedule.batch_size(tokens))
        tokens += out[-1] * schedule.n_ctx
    return out


def test_ramp_batches_do_not_depend_on_the_world_size() -> None:
    assert _batches(_schedule(1), 6) == _batches(_schedule(2), 6) == BATCHES


def test_a_quantum_the_world_size_does_not_divide_is_a_clear_error() -> None:
    with pytest.raises(UserError, match=r"schedule.ramp_quantum=4 is not divisible by .* world size 4"):
        _schedule(4)
    with pytest.raises(UserError, match="schedule.ramp_quantum in the command line: 3 is not divisible"):
        load_config(SMOKE, [*RAMP, "schedule.ramp_quantum=3"])


@pytest.fixture(scope="module")
def ramp_runs(prepared: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    def get(procs: int) -> Path:
        return once_per_session(
            tmp_path_factory, f"ramp_{procs}p", lambda run: train(run, prepared, *RAMP, procs=procs) and None
        )

    return get


def _global_steps(run: Path, step: int) -> int:
    states = torch.load(checkpoint_dir(run, step) / "mp_rank_00_model_states.pt", weights_only=False)
    return int(states["global_steps"])


@pytest.mark.slow
def test_each_step_is_one_deepspeed_step_through_the_ramp(ramp_runs) -> None:  # noqa: ANN001
    run = ramp_runs(1)
    tokens = [m["tokens"] for m in metrics(run)]
    assert tokens == [sum(BATCHES[: i + 1]) * 128 for i in range(6)]
    assert [_global_steps(run, s) for s in (3, 6)] == [3, 6]  # DeepSpeed's optimizer steps = ours


@pytest.mark.slow
def test_resume_mid_ramp_is_bitwise_exact(ramp_runs, prepared: Path, tmp_path: Path) -> None:  # noqa: ANN001
    ref = ramp_runs(1)
    resumed = fork_run(ref, tmp_path / "resumed", 3)
    train(resumed, prepared, *RAMP)
    want, got = losses(ref), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in got] == [want[s] for s in got]  # exact: the accumulation changes at steps 4-6


@pytest.mark.slow
def test_two_processes_equal_one_through_the_ramp(ramp_runs) -> None:  # noqa: ANN001
    one, two = losses(ramp_runs(1)), losses(ramp_runs(2))
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:  # the same samples in every step; only the order of fp32 sums differs
        assert abs(one[step] - two[step]) <= 1e-5 * one[step], (step, one[step], two[step])
    assert [_global_steps(ramp_runs(2), s) for s in (3, 6)] == [3, 6]


@pytest.mark.slow
def test_resume_mid_ramp_on_another_process_count(ramp_runs, prepared: Path, tmp_path: Path) -> None:  # noqa: ANN001
    ref = ramp_runs(2)
    resumed = fork_run(ref, tmp_path / "resumed", 3)
    proc = train(resumed, prepared, *RAMP)
    assert "written by 2" in proc.stdout
    want, got = losses(ref), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-4 * want[step], (step, got[step], want[step])
    assert [m["tokens"] for m in metrics(resumed)] == [sum(BATCHES[: i + 1]) * 128 for i in range(3, 6)]


# -- the run's totals through the ramp: prepare, inspect, plan and the ladder read one count ---------------------
# The case: 400 steps whose ramp reaches the full batch of 64 at 1M tokens (step 260).
RUN = [
    "train.global_batch=64",
    "schedule.ramp_tokens=1000000",
    "schedule.ramp_start_tokens=2048",
    "train.max_steps=400",
]


def _summed(cfg_overrides: list[str], world_size: int) -> tuple[int, int]:
    """(samples, tokens) of the whole run by summing the schedule's batch size step by step."""
    cfg = load_config(SMOKE, cfg_overrides)
    batches = _batches(Schedule.from_config(cfg, world_size=world_size), cfg.train.max_steps)
    return sum(batches), sum(batches) * cfg.model.n_ctx


def _figures(text: str, pattern: str) -> list[int]:
    """The numbers in the first match of `pattern`'s groups, commas removed."""
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return [int(x.replace(",", "")) for x in match.groups()]


def test_prepare_inspect_and_plan_count_the_same_ramped_run(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = [f"data.dir={prepared}", *SMALL_DATA, *RUN]
    samples, tokens = _summed(run, world_size=1)
    assert samples < 400 * 64  # the ramp's early steps are smaller than the full batch
    planned = r"planned run: ([\d,]+) samples x 128 tokens = ([\d,]+) tokens"
    tables = {}
    for command in (["prepare", SMOKE, *run], ["inspect", SMOKE, *run, "--steps", "1:401"]):
        assert main(command) == 0
        out = capsys.readouterr().out
        assert _figures(out, planned) == [samples, tokens], command[0]
        tables[command[0]] = out[out.rindex("mixture of") :]
    assert tables["prepare"] == tables["inspect"]  # the epochs columns too
    assert main(["plan", SMOKE, *run]) == 0
    out = capsys.readouterr().out
    assert _figures(out, r"400 steps, ([\d,]+) samples, ([\d,]+) tokens") == [samples, tokens]


def test_inspect_counts_every_step_of_the_ramped_run(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = [f"data.dir={prepared}", *SMALL_DATA, *RUN]
    samples, tokens = _summed(run, world_size=1)
    assert main(["inspect", SMOKE, *run, "--steps", "1:401"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert _figures(first, r"train on ([\d,]+) samples \(([\d,]+) tokens\)") == [samples, tokens]
    assert first.endswith(f"samples 0..{samples - 1:,}")


def test_totals_match_the_step_by_step_sum_at_any_length() -> None:
    cfg = load_config(SMOKE, RUN)
    schedule = Schedule.from_config(cfg, world_size=1)
    for steps in (0, 1, 259, 260, 261, 400, 1000):
        batches = _batches(schedule, steps)
        assert schedule.totals(steps) == Totals(steps, sum(batches), sum(batches) * 128), steps
        done = schedule.steps_to_reach(sum(batches) * 128 or 1)
        assert done.steps == max(1, steps)
    assert run_totals(cfg, world_size=1) == schedule.totals(400)
