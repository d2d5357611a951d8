"""Helpers for end-to-end tests: run the real `scalegpt` command in subprocesses and read its output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scalegpt.train.checkpoint import checkpoint_dir, find_latest, write_latest
from scalegpt.train.osutil import free_port  # noqa: F401  (tests import it from here)

from conftest import ROOT

SMOKE = str(ROOT / "configs" / "smoke.yaml")
# The tiny smoke model with a smaller built-in corpus, so that preparing it takes seconds.
SMALL_DATA = [
    "data.sources.0.builtin_mb=0.4",
    "data.sources.1.builtin_mb=0.3",
    "data.sources.2.builtin_mb=0.4",
]


def like_a_terminal() -> None:
    """preexec_fn for a child that a test stops with Ctrl-C: SIGINT back to its default. A shell that runs
    the suite in the background (`make test &`, CI runners) starts it with SIGINT ignored, the children
    would inherit that, and no Ctrl-C could reach them; a terminal's foreground job never has it ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def scalegpt(
    *args: str,
    timeout: float = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m scalegpt ARGS` from the repository root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "scalegpt", *args],
        cwd=ROOT,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"scalegpt {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def train(
    run_dir: Path, data_dir: Path, *overrides: str, procs: int = 1, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`scalegpt train` for one process, `scalegpt launch --procs N` for several."""
    common = [f"run.dir={run_dir}", f"data.dir={data_dir}", *SMALL_DATA, *overrides]
    if procs == 1:
        return scalegpt("train", SMOKE, *common, timeout=timeout, check=check)
    return scalegpt(
        "launch",
        SMOKE,
        "--procs",
        str(procs),
        "--master-port",
        str(free_port()),
        *common,
        timeout=timeout,
        check=check,
    )


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if m["loss"] is not None}  # step 0: evaluation only


def latest_step(run_dir: Path) -> int | None:
    """The step of the complete checkpoint `latest` names, or None."""
    latest = find_latest(run_dir)
    return latest.step if latest is not None and latest.complete else None


def fork_run(src: Path, dst: Path, step: int) -> Path:
    """A new run directory holding only `src`'s checkpoint of step `step` as latest: resuming there replays
    the rest of src's run."""
    dst.mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(checkpoint_dir(src, step), checkpoint_dir(dst, step))
    write_latest(dst, step)
    return dst
