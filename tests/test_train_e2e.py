"""Training end to end with real processes: 2 ranks equal 1, accumulation, the smoke run. (That ZeRO-2
partitions the optimizer state is counted in tests/test_plan.py, beside the planner's prediction.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scalegpt.train.checkpoint import find_latest

from conftest import ROOT, TEN_STEPS
from e2e import SMALL_DATA, SMOKE, latest_step, losses, metrics, scalegpt, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def fp32_runs(reference_runs) -> dict[int, Path]:  # noqa: ANN001
    return {1: reference_runs(1), 2: reference_runs(2)}


def test_two_processes_equal_one(fp32_runs: dict[int, Path]) -> None:
    one, two = losses(fp32_runs[1]), losses(fp32_runs[2])
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    assert one[10] < one[1]
    baseline, *records = metrics(fp32_runs[2])
    assert baseline["step"] == 0 and baseline["loss"] is None and baseline["val_loss"] > records[-1]["val_loss"]
    keys = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "world_size", "elapsed_s"}
    assert keys <= set(records[0]) and all(r["step"] == i + 1 for i, r in enumerate(records))
    assert records[-1]["world_size"] == 2 and records[-1]["tokens"] == 10 * 16 * 128
    assert "val_loss" in records[4] and "val_bpb" in records[4] and "val_loss/arithmetic" in records[4]


def test_accumulation_equals_a_bigger_micro_batch(prepared: Path, tmp_path: Path) -> None:
    """4 accumulation steps of micro batch 1 equal 1 step of micro batch 4."""
    common = ["train.max_steps=3", "train.global_batch=4", "eval.every=0", "log.every=1"]
    train(tmp_path / "acc", prepared, *common, "train.micro_batch=1")
    train(tmp_path / "big", prepared, *common, "train.micro_batch=4")
    acc, big = losses(tmp_path / "acc"), losses(tmp_path / "big")
    for step in (1, 2, 3):
        assert abs(acc[step] - big[step]) <= 1e-5 * big[step], (step, acc[step], big[step])


def test_dry_run_prints_config_and_deepspeed_json() -> None:
    out = scalegpt("train", SMOKE, "--dry-run").stdout
    ds = json.loads(out[out.index("\n{") + 1 :])
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 8
    assert "model:" in out and "n_layer: 2" in out


def test_starting_over_a_different_run_is_an_error(fp32_runs: dict[int, Path], prepared: Path) -> None:
    before = (fp32_runs[1] / "metrics.jsonl").read_text()
    proc = train(fp32_runs[1], prepared, *TEN_STEPS, "optim.lr=0.01", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("scalegpt: error: run.dir")
    assert "optim.lr" in proc.stderr and (fp32_runs[1] / "metrics.jsonl").read_text() == before


def test_fp16_on_cpu_is_a_clean_error(prepared: Path, tmp_path: Path) -> None:
    proc = train(tmp_path / "run", prepared, "train.precision=fp16", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "scalegpt: error: train.precision=fp16 needs a GPU"
    )
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_the_run_and_saves_nothing(prepared: Path, tmp_path: Path) -> None:
    proc = train(
        tmp_path,
        prepared,
        "train.max_steps=10",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "schedule.warmup_tokens=0",
        "log.every=1",
        "eval.every=0",
        check=False,
    )
    assert proc.returncode == 2 and "loss became nan" in proc.stderr.lower()
    assert find_latest(tmp_path) is None


def test_smoke_run_learns(smoke_run: Path) -> None:
    records = metrics(smoke_run)
    evals = [r for r in records if "val_loss" in r]
    assert records[-1]["step"] == 200 and records[-1]["world_size"] == 2
    assert evals[-1]["val_loss"] < 0.6 * evals[0]["val_loss"]  # far below the first evaluation
    assert evals[-1]["val_loss"] < 0.5 * math.log(512)  # and far below uniform guessing
    assert latest_step(smoke_run) == 200


def torch_extensions_dir() -> str:
    """Where torch keeps JIT-built extensions now, named explicitly (torch would derive it from HOME)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root

    return str(Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu")


def test_wandb_without_a_key_runs_offline_and_never_prompts(prepared: Path, tmp_path: Path) -> None:
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalegpt",
            "train",
            SMOKE,
            f"run.dir={tmp_path}",
            f"data.dir={prepared}",
            *SMALL_DATA,
            "train.max_steps=2",
            "eval.every=0",
            "log.wandb=true",
        ],
        cwd=ROOT,
        # a bare HOME (no wandb key or settings); DeepSpeed's compiled ops stay where they are cached,
        # or the run would spend a minute rebuilding them under the new HOME
        env={**env_free, "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": torch_extensions_dir()},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].iterdir())
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


# Counts, per training step, the reads of device values (each one makes the host wait for the device) and
# the all-reduces made by the step path's own code, train/loop.py and train/metrics.py. DeepSpeed's reads
# inside engine.step are its own, and outside what the loop controls.
COUNT_SYNCS = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from scalegpt.launch.cli import main
    from scalegpt.train import loop

    ours = (sys.argv[1] + "/train/loop.py", sys.argv[1] + "/train/metrics.py")
    step, seen = [0], []

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename in ours:
                seen.append((step[0], name))
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        spy(torch.Tensor, name)
    spy(torch.cuda, "synchronize")
    spy(dist, "all_reduce")
    train_step = loop.Trainer.train_step

    def counted_step(self):
        result = train_step(self)
        step[0] = self.state.step
        return result

    loop.Trainer.train_step = counted_step
    code = main(["train", *sys.argv[2:]])
    print("SYNCS " + json.dumps(seen))
    sys.exit(code)
    """
)


def test_only_logged_steps_wait_for_the_device(prepared: Path, tmp_path: Path) -> None:
    """Unlogged steps read nothing back; a logged step reads its losses, grad norms and the stop flag with
    one all-reduce and one copy to the host."""
    overrides = ["train.max_steps=7", "log.every=3", "eval.every=0", "checkpoint.every=0"]
    args = [SMOKE, f"run.dir={tmp_path}", f"data.dir={prepared}", *SMALL_DATA, *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    proc = subprocess.run(
        [sys.executable, "-c", COUNT_SYNCS, str(ROOT), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.split("SYNCS ", 1)[1])
    by_step: dict[int, list[str]] = {}
    for step, name in seen:
        by_step.setdefault(step, []).append(name)
    assert by_step == {3: ["all_reduce", "tolist"], 6: ["all_reduce", "tolist"], 7: ["all_reduce", "tolist"]}
    assert sorted(losses(tmp_path)) == list(range(1, 8))  # and every step is still in metrics.jsonl
