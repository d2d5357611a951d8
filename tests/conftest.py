"""Shared fixtures: paths to the repository, its configs and ../shared/data."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# In-process tests use tiny tensors, where a second intra-op thread only adds spin-waiting (7x slower
# on a busy 2-core machine). Subprocess tests pick their own thread counts.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

# The corpus presets (configs/data/shakespeare.yaml, real-mix.yaml) read their files from here instead of
# downloading them, so the suite runs offline; subprocesses inherit it. Set unconditionally, so a
# developer's own mirror cannot change what the tests read.
os.environ["SCALEGPT_DATA_ROOT"] = str(SHARED_DATA)


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """Build the folder `name` once per test session, even when pytest-xdist runs the session on several
    workers (`make test`): the first worker to ask builds it under an exclusive lock, the others wait for it
    and reuse it. Without a lock each worker would train its own copy of every shared run."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above the workers' own
    path = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".complete").is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            (path / ".complete").touch()
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (CI has it; it holds the real-text corpora)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config's built-in corpus (smaller), prepared once per test session."""
    from e2e import SMALL_DATA, SMOKE, scalegpt

    return once_per_session(
        tmp_path_factory, "prepared", lambda data: scalegpt("prepare", SMOKE, f"data.dir={data}", *SMALL_DATA)
    )


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config's full built-in corpus, as `make setup` prepares it."""
    from e2e import SMOKE, scalegpt

    return once_per_session(tmp_path_factory, "smoke-data", lambda data: scalegpt("prepare", SMOKE, f"data.dir={data}"))


@pytest.fixture(scope="session")
def smoke_run(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real smoke job, as `make setup` runs it: the full built-in corpus, 2 ZeRO-2 processes."""
    from e2e import SMOKE, scalegpt

    def build(run: Path) -> None:  # the launcher picks a free port itself
        scalegpt("launch", SMOKE, "--procs", "2", f"data.dir={smoke_data}", f"run.dir={run}", timeout=600)

    return once_per_session(tmp_path_factory, "smoke-run", build)


TEN_STEPS = ["train.max_steps=10", "checkpoint.every=5", "checkpoint.keep=3", "eval.every=5", "log.every=1"]


@pytest.fixture(scope="session")
def reference_runs(prepared: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """reference_runs(procs, precision): a 10-step run (checkpoints at 5 and 10), made once per session."""
    from e2e import train

    def get(procs: int, precision: str = "fp32") -> Path:
        def build(run: Path) -> None:
            train(run, prepared, *TEN_STEPS, f"train.precision={precision}", procs=procs)

        return once_per_session(tmp_path_factory, f"{precision}_{procs}p", build)

    return get
