"""The run directory's owner: the hold that lets one job at a time write it, the metrics reader and trim,
and, end to end, concurrent starts, a dead holder, a killed launcher and a kill before the first save."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from scalegpt.train.errors import UserError
from scalegpt.train.rundir import (
    LOCK,
    METRICS,
    STALE_AFTER_S,
    Holder,
    check_free,
    metrics_rows,
    read_holder,
    take,
    trim_metrics,
)

from conftest import ROOT
from e2e import SMALL_DATA, SMOKE, free_port, latest_step, metrics


def write_lock(run_dir: Path, **fields: object) -> Holder:
    """A lock file as another job would have left it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = Holder(
        **{
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": psutil.Process().create_time(),
            "since": 1_700_000_000.0,
            "token": uuid.uuid4().hex,
            "what": "scalegpt train",
            **fields,
        }
    )
    (run_dir / LOCK).write_text(json.dumps(asdict(holder)))
    return holder


def gone_pid() -> int:
    """The id of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the hold, in this process ------------------------------------------------------------------------------
def test_a_second_take_refuses_naming_the_holder_and_release_frees_it(tmp_path: Path) -> None:
    hold = take(tmp_path / "run")
    try:
        assert hold.note is None
        with pytest.raises(UserError) as err:
            take(tmp_path / "run")
        message = str(err.value)
        assert "\n" not in message
        assert f"host {socket.gethostname()}, process {os.getpid()}, since " in message
        with pytest.raises(UserError, match="in use by"):
            check_free(tmp_path / "run")
    finally:
        hold.release()
    assert not (tmp_path / "run").exists()  # made for the hold and left empty: a refused start leaves nothing
    check_free(tmp_path / "run")
    hold = take(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("")
    hold.release()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


def test_a_holder_whose_process_is_gone_is_taken_over(tmp_path: Path) -> None:
    dead = write_lock(tmp_path, pid=gone_pid())
    check_free(tmp_path)  # the launcher's check lets it through too
    hold = take(tmp_path)
    try:
        assert hold.note is not None and f"process {dead.pid} is gone" in hold.note
        found = read_holder(tmp_path)
        assert found is not None and found[0].token == hold.holder.token
    finally:
        hold.release()


def test_a_reused_process_id_is_not_the_holder(tmp_path: Path) -> None:
    """This process's id, with another start time: the holder's process ended and the id went to us."""
    write_lock(tmp_path, started=psutil.Process().create_time() - 1000)
    hold = take(tmp_path)
    try:
        assert hold.note is not None and "now belongs to another process" in hold.note
    finally:
        hold.release()


def test_another_hosts_fresh_heartbeat_holds_and_a_stale_one_does_not(tmp_path: Path) -> None:
    other = write_lock(tmp_path, host="node-elsewhere", pid=4242)
    with pytest.raises(UserError, match="on host node-elsewhere, process 4242, since 2023-11-14 22:13:20 UTC"):
        take(tmp_path)
    old = time.time() - STALE_AFTER_S - 5
    os.utime(tmp_path / LOCK, (old, old))
    hold = take(tmp_path)
    try:
        assert hold.note is not None and "host node-elsewhere" in hold.note and "heartbeat stopped" in hold.note
        found = read_holder(tmp_path)
        assert found is not None and found[0].token != other.token
    finally:
        hold.release()


def test_a_garbage_lock_file_is_one_clear_line_and_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text("{not json")
    with pytest.raises(UserError) as err:
        take(tmp_path)
    assert "\n" not in str(err.value)
    assert f"remove {tmp_path / LOCK}" in str(err.value)
    assert (tmp_path / LOCK).read_text() == "{not json"


def test_the_heartbeat_moves_and_a_lost_hold_is_noticed(tmp_path: Path) -> None:
    hold = take(tmp_path, heartbeat_s=0.05)
    try:
        old = time.time() - 1000
        os.utime(tmp_path / LOCK, (old, old))
        deadline = time.monotonic() + 10
        while (tmp_path / LOCK).stat().st_mtime == old and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / LOCK).stat().st_mtime > old
        write_lock(tmp_path, token="someone-else")
        deadline = time.monotonic() + 10
        while not hold.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hold.lost
    finally:
        hold.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "someone-else"  # not ours to remove


# -- metrics.jsonl --------------------------------------------------------------------------------------------
def test_trim_keeps_the_steps_through_the_state_once_each(tmp_path: Path) -> None:
    lines = [{"step": s, "loss": float(s)} for s in (0, 1, 2, 3, 1, 2)] + ["{cut sh"]
    (tmp_path / METRICS).write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    rows, bad = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and bad == 1
    trim_metrics(tmp_path, 2)
    assert [json.loads(line)["step"] for line in (tmp_path / METRICS).read_text().splitlines()] == [0, 1, 2]
    trim_metrics(tmp_path, 2, replace={"event": "rewind"})
    assert metrics_rows(tmp_path)[0][-1] == {"step": 2, "loss": 2.0, "event": "rewind"}
    trim_metrics(tmp_path, -1)
    assert (tmp_path / METRICS).read_text() == ""


# -- end to end ---------------------------------------------------------------------------------------------
class Job:
    """`python -m scalegpt ARGS` in the background, in its own process group as a shell job would be, its
    output in a file (a pipe nobody reads would stop it once full)."""

    def __init__(self, log: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RANK", None)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scalegpt", *args],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout), self.output()

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 600) -> None:
        """Poll `ready` until it holds; fail with the job's output when the job ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output()[-3000:]}"
            time.sleep(0.2)


def train_args(run: Path, data: Path, *overrides: str) -> list[str]:
    return ["train", SMOKE, f"run.dir={run}", f"data.dir={data}", *SMALL_DATA, *overrides]


def launch_args(run: Path, data: Path, *overrides: str) -> list[str]:
    common = [f"run.dir={run}", f"data.dir={data}", *SMALL_DATA, *overrides]
    return ["launch", SMOKE, "--procs", "2", "--master-port", str(free_port()), *common]


def one_trained_one_refused(results: list[tuple[int, str]], run: Path) -> None:
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(out for code, out in results if code == 2)
    lines = [line for line in refused.splitlines() if line.startswith("scalegpt: error:")]
    assert len(lines) == 1 and f"run.dir {run} is in use by scalegpt train" in lines[0], refused
    assert "Traceback" not in refused
    steps = [m["step"] for m in metrics(run)]
    assert steps == sorted(set(steps))  # one writer: no step twice
    assert not (run / LOCK).exists()  # the one that trained let go when it ended


LONG = ["train.max_steps=100000", "eval.every=0", "checkpoint.every=3", "log.every=1"]
"""A run far longer than the other job's start: the refusal must come while the holder still trains."""


def refused_while_the_other_trains(jobs: list[Job], run: Path) -> list[tuple[int, str]]:
    """Wait for the first of two jobs to end: it must be the refused one, with the other still training (so
    the test does not depend on which starts faster, or on a short run ending first under load). The one
    training is then stopped with SIGTERM, which finishes its step, saves and exits 0."""
    deadline = time.monotonic() + 600
    while all(job.proc.poll() is None for job in jobs):
        assert time.monotonic() < deadline, [job.output()[-2000:] for job in jobs]
        time.sleep(0.2)
    holder = next(job for job in jobs if job.proc.poll() is None)  # StopIteration: both ended
    holder.wait_for("a logged step", lambda: rows_written(run, 1))
    os.killpg(holder.pid, signal.SIGTERM)
    return [job.finish() for job in jobs]


@pytest.mark.slow
def test_two_trains_at_once_one_trains_the_other_names_it(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = train_args(run, prepared, *LONG)
    jobs = [Job(tmp_path / f"{i}.log", *args) for i in range(2)]
    one_trained_one_refused(refused_while_the_other_trains(jobs, run), run)
    assert latest_step(run) is not None  # the stopped holder saved


@pytest.mark.slow
def test_a_train_beside_a_launch_one_trains_the_other_exits_2(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    jobs = [Job(tmp_path / "train.log", *train_args(run, prepared, *LONG))]
    jobs.append(Job(tmp_path / "launch.log", *launch_args(run, prepared, *LONG)))
    one_trained_one_refused(refused_while_the_other_trains(jobs, run), run)
    assert {m["world_size"] for m in metrics(run)} in ({1}, {2})


def rows_written(run: Path, n: int) -> bool:
    return (run / METRICS).is_file() and len((run / METRICS).read_text().splitlines()) >= n


@pytest.mark.slow
def test_a_holder_killed_with_9_is_taken_over_and_no_step_is_logged_twice(prepared: Path, tmp_path: Path) -> None:
    """A kill -9 before the first checkpoint, then a restart: the restart says it took over the dead
    holder's run directory, and metrics.jsonl holds each step once (it held steps 0-5 twice before)."""
    run = tmp_path / "run"
    args = train_args(run, prepared, "train.max_steps=12", "checkpoint.every=1000", "log.every=1", "eval.every=4")
    first = Job(tmp_path / "first.log", *args)
    first.wait_for("logged steps", lambda: rows_written(run, 4))
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait()
    assert latest_step(run) is None and (run / LOCK).is_file()
    code, out = Job(tmp_path / "again.log", *args).finish()
    assert code == 0, out
    assert f"took over run.dir {run} from scalegpt train on host {socket.gethostname()}, process {first.pid}" in out
    assert "is gone" in out
    assert [m["step"] for m in metrics(run)] == list(range(13))


def running(proc: psutil.Process) -> bool:
    """Alive, and not a zombie: an exited orphan waits to be reaped by whatever PID 1 this machine has."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_rank(proc: psutil.Process) -> bool:
    words = proc.cmdline()
    return any(words[i : i + 3] == ["-m", "scalegpt", "train"] for i in range(len(words)))


@pytest.mark.slow
def test_killing_the_launchers_process_group_ends_every_rank(prepared: Path, tmp_path: Path) -> None:
    """kill -9 of `scalegpt launch`'s group: its ranks, in DeepSpeed's group, go too, and the next start
    is free to take the run directory over."""
    run = tmp_path / "run"
    overrides = ("train.max_steps=100000", "eval.every=0", "log.every=1")
    launcher = Job(tmp_path / "launch.log", *launch_args(run, prepared, *overrides))
    try:
        launcher.wait_for("logged steps", lambda: rows_written(run, 2))
        everything = psutil.Process(launcher.pid).children(recursive=True)
        assert len([p for p in everything if is_rank(p)]) == 2, [p.cmdline() for p in everything]
        assert os.getpgid(everything[0].pid) != os.getpgid(launcher.pid)  # out of reach of the group's kill
        os.killpg(os.getpgid(launcher.pid), signal.SIGKILL)
        launcher.proc.wait()
        deadline = time.monotonic() + 10
        while (alive := [p for p in everything if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert "its launcher (process" in launcher.output()
        check_free(run)  # rank 0 held it, and is gone
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True) if launcher.proc.poll() is None else []:
            p.kill()
        launcher.proc.kill()
