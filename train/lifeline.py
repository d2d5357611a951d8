"""The ranks' tie to the `scalegpt launch` that started them: when it dies (a kill -9 of it, or of its
process group), every rank it started on its machine ends within about a second.

The ranks are the launcher's grandchildren (scalegpt launch -> DeepSpeed's runner -> DeepSpeed's
launch.py or torchrun -> rank) and run in another process group, so neither a signal to the launcher's
group nor PR_SET_PDEATHSIG (which follows only the direct parent) reaches them. So the launcher names
itself in the ranks' environment (host, process id, start time) and each rank watches that process from
a thread. A rank on another node (a hostfile's) does not watch: its own runner there stops it.
SIGTERM and SIGUSR1 are left alone: the launcher forwards them, and the ranks save and exit 0.

Standard library and psutil only: the launcher imports it before anything heavy.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

import psutil

LAUNCHER_ENV = "SCALEGPT_LAUNCHER"
"""`HOST PID START_TIME` of the `scalegpt launch` process that started this rank."""
WATCH_S = 0.5
"""How often a rank looks for its launcher."""


def process_started(pid: int) -> float | None:
    """The start time of process `pid` on this host, or None when there is no such process (a zombie
    counts as gone: it has stopped and only waits for its parent to collect it)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's process: it exists, and its start time is unknown
        return -1.0


def same_process(pid: int, started: float) -> bool:
    """Whether process `pid` on this host is still the one that started at `started` (process ids are
    reused, start times are not)."""
    now = process_started(pid)
    return now is not None and (now < 0 or abs(now - started) < 1.0)


def launcher_mark() -> dict[str, str]:
    """The environment entry that ties the ranks this process starts to it."""
    return {LAUNCHER_ENV: f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time()!r}"}


def watch_launcher(environ: Mapping[str, str] = os.environ) -> threading.Thread | None:
    """In a rank: end this process when the launcher named in `environ` is gone. None when no launcher
    of ours on this host started it (plain `train`, a rank on another node)."""
    try:
        host, pid, started = environ[LAUNCHER_ENV].split()
        watched = (int(pid), float(started))
    except (KeyError, ValueError):
        return None
    if host != socket.gethostname():
        return None
    thread = threading.Thread(target=_watch, args=watched, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def _watch(pid: int, started: float) -> None:
    while same_process(pid, started):
        time.sleep(WATCH_S)
    rank = os.environ.get("RANK", "?")
    print(f"scalegpt: rank {rank}: its launcher (process {pid}) is gone; stopping", file=sys.stderr, flush=True)
    os._exit(1)  # at once: the job is abandoned, and a stop that waited for a collective could hang
