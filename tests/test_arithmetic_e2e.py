"""A model trained on the built-in corpus beats chance on arithmetic, measured through `scalegpt eval`.

Chance. Free-form tasks: the majority baseline, the accuracy of always giving the most frequent answer
(2D+: 90/8100 = 1.1%). Multiple choice: the right answer is offered among the answers of three other
problems of the same task, in random order, so a model that does not read the question scores exactly
25%. "Above chance" is a one-sided binomial test at family-wise 1% (Bonferroni over the five tasks).

How much training that takes (measured on this corpus with the tiny model, 1000 problems per task):
the 200-step smoke model is at chance on every task (24-26%), and so is every run we tried before ~600
steps of 16 sequences, at learning rates from 3e-3 to 1e-2; runs of 8 sequences per step (n_ctx 128 or
64) are still at chance after 1000 steps. The test trains 800 steps of 16 sequences at the peak rate
with arithmetic at 90% of the mixture (the two other sources keep 5% each; metrics.jsonl's drawn counts
confirm the shares), in one single-threaded process: about 3 minutes on an idle core, 5 on a shared one.
That run scores mc-2D+ 58.8%, mc-3D+ 58.2% and mc-2Dx 42.4% (all p < 1e-10), while subtraction stays at
chance (mc-2D- 24.9%, mc-3D- 22.9%); the same 800 steps on the smoke mixture itself (40% arithmetic)
reach only mc-2D+ 31.6% and mc-3D+ 30.9%. Training is bitwise deterministic on CPU, so the result does
not vary from run to run; the test asks only that both additions beat chance.
"""
# This file sorts first, so that its long run starts at once on one pytest-xdist worker.

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalegpt.launch.cli import main

from e2e import SMOKE, metrics, scalegpt

MC_ARITHMETIC = ["mc-2D+", "mc-2D-", "mc-3D+", "mc-3D-", "mc-2Dx"]
# The tiny model runs as fast on one thread as on two, and the other core stays free for the other test worker.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
ARITHMETIC_RUN = [
    "train.max_steps=800",
    "train.micro_batch=16",
    "train.global_batch=16",
    "schedule.decay_tokens=100000000",  # the peak rate throughout: the run ends long before any decay
    "data.sources.0.weight=0.9",  # arithmetic
    "data.sources.1.weight=0.05",
    "data.sources.2.weight=0.05",
    "eval.every=0",
    "log.every=100",
]


@pytest.fixture(scope="module")
def arithmetic_run(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke model trained for 800 steps on the smoke job's built-in corpus, arithmetic-heavy."""
    run = tmp_path_factory.mktemp("arithmetic")
    scalegpt("train", SMOKE, f"run.dir={run}", f"data.dir={smoke_data}", *ARITHMETIC_RUN, env=ONE_THREAD, timeout=900)
    return run


@pytest.mark.slow
def test_a_model_trained_on_the_builtin_corpus_beats_chance_on_arithmetic(
    arithmetic_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", str(arithmetic_run), "--tasks", *MC_ARITHMETIC, "--shots", "0", "--num-examples", "1000"]
    assert main([*argv, "--val-batches", "0", "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    cells = json.loads(out.read_text())["fewshot"]
    assert len(cells) == 5 and all(c["chance"] == 0.25 and c["total"] == 1000 for c in cells)
    by_task = {c["task"]: c for c in cells}
    for task in ("mc-2D+", "mc-3D+"):
        cell = by_task[task]
        assert cell["p_value"] < 0.01 / len(cells) and cell["accuracy"] > 0.25, f"{task} at chance:\n{table}"
    rows = [m for m in metrics(arithmetic_run) if m["step"]]
    drawn = sum(m["drawn/arithmetic"] for m in rows)
    assert abs(drawn / (800 * 16) - 0.9) < 0.01  # the run trained on the mixture it was given
