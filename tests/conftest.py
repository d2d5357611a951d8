"""Shared fixtures: paths to the repository, its configs and ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# In-process tests use tiny tensors, where a second intra-op thread only adds spin-waiting (7x slower
# on a busy 2-core machine). Subprocess tests pick their own thread counts.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (CI has it; it holds the real-text corpora)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config's built-in corpus (smaller), prepared once per test session."""
    from e2e import SMALL_DATA, SMOKE, scalegpt

    data = tmp_path_factory.mktemp("prepared")
    scalegpt("prepare", SMOKE, f"data.dir={data}", *SMALL_DATA)
    return data


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real smoke job, as `make setup` runs it: the full built-in corpus, 2 ZeRO-2 processes."""
    from e2e import SMOKE, free_port, scalegpt

    root = tmp_path_factory.mktemp("smoke")
    data, run = root / "prepared", root / "run"
    scalegpt("prepare", SMOKE, f"data.dir={data}")
    scalegpt(
        "launch",
        SMOKE,
        "--procs",
        "2",
        "--master-port",
        str(free_port()),
        f"data.dir={data}",
        f"run.dir={run}",
        timeout=600,
    )
    return run


TEN_STEPS = ["train.max_steps=10", "checkpoint.every=5", "checkpoint.keep=3", "eval.every=5", "log.every=1"]


@pytest.fixture(scope="session")
def reference_runs(prepared: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """reference_runs(procs, precision): a 10-step run (checkpoints at 5 and 10), made once per session."""
    from e2e import train

    made: dict[tuple[int, str], Path] = {}

    def get(procs: int, precision: str = "fp32") -> Path:
        if (procs, precision) not in made:
            run = tmp_path_factory.mktemp(f"{precision}_{procs}p")
            train(run, prepared, *TEN_STEPS, f"train.precision={precision}", procs=procs)
            made[procs, precision] = run
        return made[procs, precision]

    return get
