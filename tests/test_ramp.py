"""The batch ramp: batch sizes that do not depend on the world size, and optimizer steps that accumulate
exactly their own micro batches while the accumulation changes, through a resume and across process counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalegpt.train.checkpoint import checkpoint_dir
from scalegpt.train.config.loading import load_config
from scalegpt.train.errors import UserError
from scalegpt.train.schedule import Schedule

from conftest import once_per_session
from e2e import SMOKE, fork_run, losses, metrics, train

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
