"""Mixture stages and the warmup-stable-decay schedule: per-sample stage boundaries, each source's order
running on across a boundary, per-stage epochs and the repeat warning; and end to end, a staged WSD run
that resumes exactly across the boundary and trains the same on two processes as on one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scalegpt.train.config.loading import load_config
from scalegpt.train.data.mixture import Mixture, Stage, describe
from scalegpt.train.errors import UserError
from scalegpt.train.schedule import Schedule

from conftest import TEN_STEPS
from e2e import SMALL_DATA, SMOKE, fork_run, losses, metrics, train

N_CTX = 16
BASE = {"arithmetic": 0.4, "scramble": 0.3, "prose": 0.3}
ANNEAL = Stage(start_tokens=20_000 * N_CTX + 5, weights={"scramble": 1.0, "prose": 3.0})  # no arithmetic


def staged(data: Path, *stages: Stage, seed: int = 3) -> Mixture:
    return Mixture(data, N_CTX, seed, BASE, stages=stages)


def in_order(mix: Mixture, n: int) -> dict[int, np.ndarray]:
    """Each source's window starts, in the order the first n samples draw them."""
    src, start = mix.resolve(np.arange(n))
    return {i: start[src == i] for i in range(len(mix.names))}


def test_a_sample_belongs_to_the_stage_whose_start_it_has_reached(prepared: Path) -> None:
    mix = staged(prepared, ANNEAL)
    boundary = 20_001  # the first g with g x 16 >= 320,005
    assert mix.stage_starts.tolist() == [0, boundary]
    src, _ = mix.resolve(np.arange(boundary + 30_000))
    before, after = src[:boundary], src[boundary:]
    assert 0 in before[-50:]  # arithmetic up to the last sample before the boundary ...
    assert not (after == 0).any()  # ... and never after it
    share = np.bincount(after[:30_000], minlength=3) / 30_000
    assert np.abs(share - [0.0, 0.25, 0.75]).max() < 0.002
    assert np.abs(np.bincount(before, minlength=3) / boundary - [0.4, 0.3, 0.3]).max() < 0.002


def test_samples_before_the_first_boundary_are_those_of_a_mixture_without_stages(prepared: Path) -> None:
    plain, mix = staged(prepared), staged(prepared, ANNEAL)
    g = np.arange(19_000, 20_001)
    assert np.array_equal(plain.batch(g).numpy(), mix.batch(g).numpy())


def test_each_source_continues_its_order_across_a_boundary(prepared: Path) -> None:
    """A source's k-th draw is the same window whatever the stages: its order runs on, never restarts."""
    mix, plain = staged(prepared, ANNEAL), staged(prepared)
    got, ref = in_order(mix, 60_000), in_order(plain, 200_000)
    for i in range(3):
        assert len(got[i]) <= len(ref[i])
        assert np.array_equal(got[i], ref[i][: len(got[i])]), mix.names[i]
    assert len(got[2]) > len(ref[2]) * 60_000 / 200_000  # prose was drawn more after the boundary


def test_counts_per_stage_match_the_samples(prepared: Path) -> None:
    stages = (ANNEAL, Stage(30_000 * N_CTX, {"arithmetic": 1.0, "prose": 1.0}))
    mix = staged(prepared, *stages)
    for n in (0, 1000, 20_001, 20_002, 25_555, 30_000, 31_234):
        src, _ = mix.resolve(np.arange(n))
        by_stage = mix.stage_counts(n)
        assert np.array_equal(by_stage.sum(axis=0), np.bincount(src, minlength=3)), n
        stage = np.searchsorted(mix.stage_starts, np.arange(n), side="right") - 1
        for s in range(3):
            assert np.array_equal(by_stage[s], np.bincount(src[stage == s], minlength=3)), (n, s)


def test_the_same_samples_in_any_order_of_reading(prepared: Path) -> None:
    """Purity across a boundary: ranks reading pieces, a resume mid-stage, a cache filled in another order."""
    g = np.arange(19_900, 20_300)
    whole = staged(prepared, ANNEAL).batch(g).numpy()
    fresh = staged(prepared, ANNEAL)
    chunks = [g[i : i + 7] for i in range(0, len(g), 7)]
    got = {i: fresh.batch(c).numpy() for i, c in reversed(list(enumerate(chunks)))}  # last piece first
    assert np.array_equal(np.concatenate([got[i] for i in range(len(chunks))]), whole)


def test_the_table_shows_epochs_per_stage_and_warns_past_four(prepared: Path) -> None:
    mix = staged(prepared, ANNEAL)
    n = 65_000  # prose, at 75% of the second stage, passes 4 epochs; the others stay under 2
    use = mix.consumed(n)
    over = {name for name, u in use.items() if u["epochs"] > 4}
    assert over == {"prose"}
    text = describe(mix, n)
    assert "epochs s0" in text and "epochs s1" in text and "stage 1: from 320,005 tokens (sample 20,001)" in text
    prose = next(line for line in text.splitlines() if line.startswith("prose"))
    s0, s1 = mix.stage_counts(n)[:, 2] / mix.windows[2]
    assert f"{s0:.3g}" in prose and f"{s1:.3g}" in prose and f"{use['prose']['epochs']:.3g}" in prose
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'prose'" in warnings[0] and "Muennighoff" in warnings[0]
    assert "warning" not in describe(mix, 40_000)


def test_stage_config_errors_name_the_key(tmp_path: Path) -> None:
    def load(*overrides: str) -> None:
        load_config(SMOKE, list(overrides))

    stage = "data.stages=[{start_tokens: 100, weights: {prose: 1}}, {start_tokens: 50, weights: {prose: 1}}]"
    with pytest.raises(UserError, match=r"data.stages.1.start_tokens in the command line: must be above 100"):
        load(stage)
    with pytest.raises(UserError, match=r"data.stages.0.weights .*\['poetry'\], which are not in data.sources"):
        load("data.stages=[{start_tokens: 100, weights: {poetry: 1}}]")
    with pytest.raises(UserError, match=r"data.stages.0.weights .*non-negative"):
        load("data.stages=[{start_tokens: 100, weights: {prose: 0}}]")
    with pytest.raises(UserError, match=r"schedule.kind .*'cosine' or 'wsd'"):
        load("schedule.kind=linear")
    with pytest.raises(UserError, match=r"schedule.decay_start_tokens .*warmup_tokens <= decay_start_tokens"):
        load("schedule.kind=wsd", "schedule.decay_start_tokens=100")
    cfg = load_config(SMOKE, ["data.stages=[{start_tokens: 4096, weights: {prose: 2, scramble: 1}}]"])
    assert cfg.data.stages[0].start_tokens == 4096 and dict(cfg.data.stages[0].weights) == {"prose": 2, "scramble": 1}


def test_wsd_is_warmup_then_flat_then_linear_down() -> None:
    cfg = load_config(
        SMOKE,
        [
            "schedule.kind=wsd",
            "schedule.warmup_tokens=1000",
            "schedule.decay_start_tokens=5000",
            "schedule.decay_tokens=9000",
            "schedule.min_lr_ratio=0.1",
            "optim.lr=1.0",
        ],
    )
    s = Schedule.from_config(cfg, world_size=1)
    assert s.lr(500) == pytest.approx(0.5)
    assert s.lr(1000) == s.lr(3000) == s.lr(4999) == 1.0
    assert s.lr(5000) == 1.0 and s.lr(7000) == pytest.approx(0.55) and s.lr(9000) == pytest.approx(0.1)
    assert s.lr(20_000) == pytest.approx(0.1)
    cosine = Schedule.from_config(load_config(SMOKE), world_size=1)
    middle = (40_960 + 409_600) // 2  # the smoke schedule: half way down the cosine, by default
    assert cosine.kind == "cosine" and cosine.lr(middle) == pytest.approx(0.55 * cosine.peak_lr)


# -- end to end ----------------------------------------------------------------------------------

# Steps of 16 samples x 128 tokens = 2048 tokens. The stage starts at sample 102, inside step 7 (samples
# 96-111); WSD warms up over 2 steps, stays at the peak to step 6, and decays to the floor at step 10.
STAGED = [
    "data.stages=[{start_tokens: 13000, weights: {scramble: 1, prose: 3}}]",
    "schedule.kind=wsd",
    "schedule.warmup_tokens=4096",
    "schedule.decay_start_tokens=12288",
    "schedule.decay_tokens=20480",
]


@pytest.fixture(scope="module")
def staged_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("staged")
    train(run, prepared, *TEN_STEPS, *STAGED)
    return run


@pytest.mark.slow
def test_a_staged_wsd_run_draws_and_steps_as_configured(staged_run: Path, prepared: Path) -> None:
    rows = {m["step"]: m for m in metrics(staged_run) if m["step"]}
    peak = load_config(SMOKE).optim.lr
    assert [rows[s]["lr"] for s in (3, 4, 5, 6)] == [peak] * 4
    assert rows[8]["lr"] == pytest.approx(peak * (1 - 0.9 * (16384 - 12288) / 8192))
    assert rows[10]["lr"] == pytest.approx(0.1 * peak)
    mix = Mixture.for_config(load_config(SMOKE, [f"data.dir={prepared}", *SMALL_DATA, *STAGED]))
    for step in range(1, 11):
        expect = mix.source_counts(range((step - 1) * 16, step * 16))
        assert {n: rows[step][f"drawn/{n}"] for n in mix.names} == expect, step
    assert rows[7]["drawn/arithmetic"] > 0 and all(rows[s]["drawn/arithmetic"] == 0 for s in (8, 9, 10))


@pytest.mark.slow
def test_resume_across_a_stage_boundary_is_exact(staged_run: Path, prepared: Path, tmp_path: Path) -> None:
    resumed = fork_run(staged_run, tmp_path / "resumed", 5)
    train(resumed, prepared, *TEN_STEPS, *STAGED)
    want, got = losses(staged_run), losses(resumed)
    assert sorted(got) == list(range(6, 11))
    assert [got[s] for s in got] == [want[s] for s in got]  # bit for bit


@pytest.mark.slow
def test_two_processes_equal_one_across_a_stage_boundary(staged_run: Path, prepared: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    train(two, prepared, *TEN_STEPS, *STAGED, procs=2)
    one_l, two_l = losses(staged_run), losses(two)
    assert sorted(two_l) == list(range(1, 11))
    for step in one_l:
        assert abs(one_l[step] - two_l[step]) <= 1e-5 * abs(one_l[step]), (step, one_l[step], two_l[step])
    drawn = [{k: v for k, v in m.items() if k.startswith("drawn/")} for m in metrics(two) if m["step"]]
    assert drawn == [{k: v for k, v in m.items() if k.startswith("drawn/")} for m in metrics(staged_run) if m["step"]]
