"""Reporting (train/evaluation/report.py) and the training-time probe (train/evaluation/probe.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from scalegpt.model import GPT, ModelConfig
from scalegpt.train.data.mixture import Mixture
from scalegpt.train.data.tokenizer import train_bpe
from scalegpt.train.evaluation.fewshot import ShotResult
from scalegpt.train.evaluation.probe import PROBE_TASKS, FewshotProbe
from scalegpt.train.evaluation.report import (
    epochs_elapsed,
    fewshot_table,
    log_eval_tables,
    validation_table,
)
from scalegpt.train.osutil import write_json_atomic

from eval_helpers import TinyWorld, tiny_world


def result(task: str, setting: str, shots: int, correct: int, p: float) -> ShotResult:
    return ShotResult(task, setting, shots, "choice", "acc", correct, 100, correct / 100, 0.25, p)


RESULTS = [
    result("mc-2D+", "0", 0, 31, 0.1),
    result("mc-2D+", "few", 7, 52, 1e-9),
    result("2D+", "0", 0, 0, 1.0),
    result("2D+", "few", 6, 2, 0.3),
]


def test_fewshot_table() -> None:
    lines = fewshot_table(RESULTS).splitlines()
    assert lines[0].split() == ["task", "metric", "chance", "K=0", "K=few"]
    assert lines[1].split() == ["mc-2D+", "acc", "25.0%", "31.0%", "52.0%*", "(K=7)"]
    assert lines[2].split() == ["2D+", "acc", "25.0%", "0.0%", "2.0%", "(K=6)"]
    assert "100 examples per cell" in lines[-1]
    table = validation_table({"prose": {"loss": 1.5, "perplexity": 4.4817, "bpb": 0.9, "tokens": 4096.0}})
    assert table.splitlines()[1].split() == ["prose", "1.5000", "4.482", "0.9000", "4,096"]


def test_json_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    write_json_atomic(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(out, {"a": object()})  # fails half way through serializing
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


class Recorder:
    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.tables[name] = rows


def test_eval_tables_for_wandb() -> None:
    log = Recorder()
    log_eval_tables(log, RESULTS, {"prose": {"loss": 1.5, "perplexity": 4.48, "bpb": 0.9, "tokens": 8.0}})
    assert set(log.tables) == {"eval/fewshot", "eval/validation"}
    assert log.tables["eval/fewshot"][1] == RESULTS[1].row()
    assert log.tables["eval/fewshot"][1]["accuracy"] == 0.52
    assert log.tables["eval/validation"] == [
        {"source": "prose", "loss": 1.5, "perplexity": 4.48, "bpb": 0.9, "tokens": 8.0}
    ]
    log = Recorder()
    log_eval_tables(log, [], None, prefix="probe")
    assert log.tables == {}


def test_epochs_elapsed(tmp_path_factory: pytest.TempPathFactory) -> None:
    world: TinyWorld = tiny_world(tmp_path_factory)
    mixture = Mixture(world.data, 32, 3)
    got = epochs_elapsed(mixture, 100 * 32)
    assert set(got) == {"epochs/arithmetic", "epochs/prose"}
    assert got["epochs/prose"] == mixture.consumed(100)["prose"]["epochs"] > 0


def test_probe_is_small_deterministic_and_leaves_training_mode() -> None:
    tok = train_bpe(["Q: What is 12 plus 34? A: 46"], 257)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, n_ctx=96, vocab_size=257)).train()
    probe = FewshotProbe(tok, 96, num_examples=8)
    first = probe(model)
    assert set(first) == {f"fewshot/{t}" for t in PROBE_TASKS}
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert model.training
    assert probe(model) == first
    assert [p.settings[0][0] for p in probe.plans] == ["few", "few"] and probe.plans[0].settings[0][1] >= 1
