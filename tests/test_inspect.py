"""The run's weights are the weights: a run trained with weights overridden on the command line draws those
shares (its own drawn/<source> counts in metrics.jsonl), `scalegpt inspect` reports the same samples, and
eval, plot and a resume all read the run's config; plus inspect's decoded samples, skipped ranges and
errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scalegpt.launch import inspect_cmd
from scalegpt.launch.cli import main
from scalegpt.launch.plot import epochs_by_source
from scalegpt.train.config.loading import load_config
from scalegpt.train.data.mixture import Mixture
from scalegpt.train.data.steps import rank_indices
from scalegpt.train.data.tokenizer import load_tokenizer
from scalegpt.train.evaluation.validation import open_validation_data

from e2e import SMALL_DATA, SMOKE, metrics, train

WEIGHTS = ["data.sources.0.weight=0.9", "data.sources.1.weight=0.05", "data.sources.2.weight=0.05"]
SHARES = {"arithmetic": 0.9, "scramble": 0.05, "prose": 0.05}
# 10 steps of 1,000 samples of 16 tokens: 10,000 samples, cheap to train with the tiny model.
BIG_STEPS = [
    "model.n_ctx=16",
    "train.micro_batch=500",
    "train.global_batch=1000",
    "train.max_steps=10",
    "eval.every=0",
    "log.every=5",
    "checkpoint.every=0",
]


@pytest.fixture(scope="module")
def weighted_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`scalegpt train` with the weights overridden at train time (prepare planned 0.4/0.3/0.3)."""
    run = tmp_path_factory.mktemp("weighted")
    train(run, prepared, *BIG_STEPS, *WEIGHTS)
    return run


def inspect_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"inspect-{len(list(tmp_path.glob('inspect-*')))}.json"
    assert main(["inspect", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_trainer_draws_the_weights_given_at_train_time(weighted_run: Path, prepared: Path, tmp_path: Path) -> None:
    rows = [m for m in metrics(weighted_run) if m["step"]]
    assert [m["step"] for m in rows] == list(range(1, 11))
    drawn = {name: sum(m[f"drawn/{name}"] for m in rows) for name in SHARES}
    assert sum(drawn.values()) == 10_000
    for name, share in SHARES.items():
        assert abs(drawn[name] / 10_000 - share) < 0.01, (name, drawn)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert [e["weight"] for e in manifest["sources"]] == [0.4, 0.3, 0.3]  # prepare's plan was not what ran

    # inspect, given the run directory, reports those very samples, step by step and in total
    report = inspect_json(tmp_path, str(weighted_run), "--steps", "1:11")
    assert report["samples"] == 10_000 and report["sample_ranges"] == [[0, 10_000]]
    assert {n: s["count"] for n, s in report["sources"].items()} == drawn
    for name, share in SHARES.items():
        assert abs(report["sources"][name]["share"] - share) < 0.01
        assert report["sources"][name]["configured"] == pytest.approx(share)
    one = inspect_json(tmp_path, str(weighted_run), "--steps", "7:8")
    assert {n: s["count"] for n, s in one["sources"].items()} == {n: rows[6][f"drawn/{n}"] for n in SHARES}

    # and so does inspect on the config with the same overrides, before any run
    overrides = [f"data.dir={prepared}", *SMALL_DATA, *BIG_STEPS, *WEIGHTS]
    planned = inspect_json(tmp_path, SMOKE, *overrides, "--steps", "1:11")
    assert planned["sources"] == report["sources"]


@pytest.mark.slow
def test_eval_plot_and_resume_read_the_run_config(weighted_run: Path, prepared: Path) -> None:
    cfg = load_config(weighted_run / "config.yaml")
    mixture, note = open_validation_data(cfg, load_tokenizer(weighted_run / "tokenizer.json"))
    assert mixture is not None and mixture.weights.tolist() == pytest.approx([0.9, 0.05, 0.05]), note
    epochs, _ = epochs_by_source(weighted_run, [m for m in metrics(weighted_run) if m["step"]])
    assert epochs is not None
    used = Mixture.for_config(cfg).consumed(10_000)
    assert {name: ys[-1] for name, (_, ys) in epochs.items()} == {n: u["epochs"] for n, u in used.items()}

    changed = train(weighted_run, prepared, *BIG_STEPS, *WEIGHTS[:2], "data.sources.2.weight=0.5", check=False)
    assert changed.returncode == 2
    assert "data.sources.2.weight: 0.05 -> 0.5" in changed.stderr and "Traceback" not in changed.stderr
    stage = "data.stages=[{start_tokens: 100000, weights: {prose: 1}}]"
    added = train(weighted_run, prepared, *BIG_STEPS, *WEIGHTS, "train.max_steps=12", stage, check=False)
    assert added.returncode == 2 and "data.stages.0.start_tokens: None -> 100000" in added.stderr


def test_inspect_decodes_the_samples_it_counts(prepared: Path, tmp_path: Path) -> None:
    overrides = [f"data.dir={prepared}", *SMALL_DATA, *WEIGHTS, "train.global_batch=32"]
    report = inspect_json(tmp_path, SMOKE, *overrides, "--steps", "3:5", "--show", "3")
    assert report["sample_ranges"] == [[64, 128]]
    cfg = load_config(SMOKE, overrides)
    mix = Mixture.for_config(cfg)
    tok = load_tokenizer(prepared / "tokenizer.json")
    for shown in report["shown"]:
        g = shown["index"]
        assert shown["step"] == 3 + (g - 64) // 32
        assert shown["source"] == mix.names[int(mix.resolve([g])[0][0])]
        assert shown["text"] == tok.decode(mix.batch([g])[0, :-1].tolist())
    assert [s["index"] for s in report["shown"]][0] == 64 and len(report["shown"]) == 3
    # the union of every rank's indices is the step's global batch, whatever the world size
    for world in (1, 2, 4):
        ranks = [rank_indices(64, 32, micro_batch=8, world_size=world, rank=r) for r in range(world)]
        assert sorted(sum(ranks, [])) == list(range(64, 96))


@pytest.mark.slow
def test_inspect_of_a_run_directory_follows_its_skipped_samples(weighted_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        shutil.copy(weighted_run / name, run / name)
    report = inspect_json(tmp_path, str(run), "--steps", "3:6")
    assert report["skipped"] == [] and report["sample_ranges"] == [[2000, 5000]]
    # a rewind from step 2 past the spike at step 4: steps 3 on draw from sample 4000
    skip = {"from_step": 2, "spike_step": 4, "start": 2000, "end": 4000, "lr_factor": 1.0, "lr_until_step": 2}
    (run / "skipped.json").write_text(json.dumps([skip]))
    report = inspect_json(tmp_path, str(run), "--steps", "3:6")
    assert report["skipped"] == [[2000, 4000]] and report["sample_ranges"] == [[4000, 7000]]
    mix = Mixture.for_config(load_config(run / "config.yaml"))
    assert {n: s["count"] for n, s in report["sources"].items()} == mix.source_counts(np.arange(4000, 7000))


def test_inspect_errors_are_one_line(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["inspect", SMOKE, f"data.dir={prepared}", *SMALL_DATA]
    for steps in ("5", "0:3", "4:4", "a:b"):
        assert main([*base, "--steps", steps]) == 2
        err = capsys.readouterr().err
        assert err.startswith("scalegpt: error: --steps") and err.count("\n") == 1, err
    assert main(["inspect", str(tmp_path), "--steps", "1:2"]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


@pytest.mark.slow  # its fixture walks millions of samples
def test_a_long_walk_through_skipped_samples_shows_progress(
    weighted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With skipped ranges the steps are walked one by one, as the trainer took them; a long walk says how
    far it is (every PROGRESS_STEPS steps, lowered here so that a short run walks past it)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        shutil.copy(weighted_run / name, run / name)
    skip = {"from_step": 2, "spike_step": 4, "start": 2000, "end": 4000, "lr_factor": 1.0, "lr_until_step": 2}
    (run / "skipped.json").write_text(json.dumps([skip]))
    monkeypatch.setattr(inspect_cmd, "PROGRESS_STEPS", 4)
    report = inspect_json(tmp_path, str(run), "--steps", "3:11")
    assert report["sample_ranges"] == [[4000, 12000]]
    err = capsys.readouterr().err
    assert [line.split()[5] for line in err.splitlines() if "walked to step" in line] == ["4", "8"]


def test_inspect_refuses_steps_past_the_run(weighted_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weighted_run), "--steps", "5:12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_steps=10" in err and "--steps 5:11" in err, err
    assert main(["inspect", str(weighted_run), "--steps", "5:11"]) == 0  # the last step is step 10
