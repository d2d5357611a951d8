"""`scalegpt eval` through the real entry point (scalegpt.launch.cli.main): the results table, the JSON
file, validation on prepared data, and one-line errors for bad tasks and too many shots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scalegpt.launch.cli import main
from scalegpt.train.data.mixture import Mixture
from scalegpt.train.weights import load_for_inference

from eval_helpers import TinyWorld, tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return tiny_world(tmp_path_factory)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("scalegpt: error: ")
    return err[0]


def test_bad_task_name_lists_the_valid_ones(world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["eval", str(world.export), "--tasks", "2D+", "3D*"])
    assert "unknown task '3D*'" in err
    assert "valid tasks: 2D+, 2D-, 3D+, 3D-, 2Dx, mc-2D+" in err and "reverse-inverse" in err


def test_too_many_shots_names_k_and_n_ctx(world: TinyWorld, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["eval", str(world.export), "--tasks", "2D+", "--shots", "0", "3"])
    assert "K=3 demonstrations of task 2D+ do not fit the model's context of n_ctx=32 tokens" in err
    assert "at most K=" in err
    err = one_line_error(capsys, ["eval", str(world.export), "--shots", "500"])
    assert "K=500" in err and "n_ctx=32" in err
    err = one_line_error(capsys, ["eval", str(world.export), "--shots", "some"])
    assert "--shots takes non-negative integers or 'few', got 'some'" in err


def test_other_bad_arguments(world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--num-examples must be at least 1" in one_line_error(
        capsys, ["eval", str(world.export), "--num-examples", "0"]
    )
    assert "is a directory" in one_line_error(capsys, ["eval", str(world.export), "--json", str(tmp_path)])
    assert "does not exist" in one_line_error(capsys, ["eval", str(tmp_path / "nope")])
    assert "no manifest.json" in one_line_error(
        capsys, ["eval", str(world.export), "--tasks", "2D+", "--data-dir", str(tmp_path)]
    )


def test_eval_writes_tables_and_json(world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    out.write_text("old")  # replaced whole, never appended to
    argv = ["eval", str(world.export), "--tasks", "mc-2D+", "RW", "--shots", "0", "few", "--num-examples", "5"]
    assert main([*argv, "--json", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "few-shot accuracy" in text and "mc-2D+" in text and "reverse" in text
    assert "K=few" in text and "bits/byte" in text
    report = json.loads(out.read_text())
    rows = report["fewshot"]
    assert [(r["task"], r["setting"]) for r in rows] == [
        ("mc-2D+", "0"),
        ("mc-2D+", "few"),
        ("reverse", "0"),
        ("reverse", "few"),
    ]
    assert all(r["total"] == 5 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["chance"] == 0.25 and rows[0]["metric"] == "acc" and "acc_unnormalized" in rows[0]
    assert rows[2]["metric"] == "exact_match" and rows[2]["chance"] < 0.001
    assert rows[1]["shots"] >= 0 and report["n_ctx"] == 32
    assert set(report["validation"]["metrics"]) == {"arithmetic", "prose", "mixture"}
    assert not list(tmp_path.glob(".results.json.*")), "the temporary file was left behind"


def test_validation_matches_a_direct_computation(world: TinyWorld, tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    argv = ["eval", str(world.export), "--tasks", "2D+", "--shots", "0", "--num-examples", "1"]
    assert main([*argv, "--batch-size", "4", "--val-batches", "2", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["validation"]["metrics"]
    model, _, cfg = load_for_inference(world.export, device="cpu")
    mixture = Mixture(world.data, cfg.model.n_ctx, cfg.run.seed)
    mix_loss = 0.0
    for i, name in enumerate(mixture.names):
        windows = torch.cat(list(mixture.val_batches(name, 4, 2)))
        assert len(windows) == min(8, mixture.val_windows(name))
        logits = model(windows[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
        assert got[name]["loss"] == pytest.approx(loss, rel=1e-5)
        assert got[name]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        bpb = loss / math.log(2) / mixture.val_bytes_per_token(name)
        assert got[name]["bpb"] == pytest.approx(bpb, rel=1e-5)
        mix_loss += float(mixture.weights[i]) * loss
    assert got["mixture"]["loss"] == pytest.approx(mix_loss, rel=1e-5)


def test_missing_default_data_is_a_note_not_an_error(
    world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "export"
    moved.mkdir()
    for f in world.export.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg_text = (moved / "config.yaml").read_text().replace(str(world.data), str(tmp_path / "gone"))
    (moved / "config.yaml").write_text(cfg_text)
    assert main(["eval", str(moved), "--tasks", "2D+", "--shots", "0", "--num-examples", "2"]) == 0
    assert f"validation skipped: no prepared data at {tmp_path / 'gone'}" in capsys.readouterr().out
