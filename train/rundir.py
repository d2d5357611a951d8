"""The run directory: the names of what it holds, the one reader of metrics.jsonl, whether a config may
continue the run it holds, and the hold that lets one job at a time write it.

Layout (run.dir):
    config.yaml      the resolved config the run was started with; a resume must agree with it
    tokenizer.json   the tokenizer the data was prepared with
    metrics.jsonl    one JSON object per logged step, steps in order, none twice
    checkpoints/     one folder per saved step, plus `latest` (see train/checkpoint.py)
    skipped.json     the samples each rewind skips;  faults.json  the fire drills already fired
    writer.lock      who holds the run directory now (below)
    sbatch.sh        the job script `launch --slurm` submitted;  curves.png  `scalegpt plot`'s figure

One writer at a time. A job that trains holds the run directory for as long as it runs; a second
`train`, `launch` or ladder rung on it refuses with one line naming the holder, and changes nothing.
Readers (sample, eval, export, plot, inspect) never look at the hold.

- Who holds it: rank 0 of the trainer, for the whole job. It is the one process that exists in every
  way a job starts (plain `train`, `launch --procs/--gpus`, a hostfile, an sbatch script, a ladder
  rung), and the one that writes the run directory's own files. `scalegpt launch` only checks the
  hold before it starts the ranks (a refusal in a second, not after the ranks' start-up), and its ranks
  never compete: only rank 0 takes it.
- The mechanism is a lock file, not flock: flock over NFS depends on the client's lock daemon and on
  Lustre on a mount option, and a held flock says nothing about who holds it. The holder writes its
  record (host, process id, the process's start time, since when) to a temporary file and hard-links it
  to `writer.lock`; link() is atomic and fails when the name exists, on local disks, NFS (the classic
  NFS-safe lock) and Lustre alike. Where a file system has no hard links, O_CREAT|O_EXCL stands in.
- A heartbeat: the holder touches the file's modification time every HEARTBEAT_S seconds.
- A holder is dead, and the next start takes over with a note saying so, when
  - it ran on this host and its process id is gone, or now belongs to another process (its start
    time differs: the id was reused);
  - it ran on another host and its heartbeat is older than STALE_AFTER_S seconds (a lost node, a
    kill -9 there). The timeout is well above NFS's attribute cache (60 s at most by default), so a
    live holder's beat is always seen in time.
- Taking over renames the stale file aside and checks that it was the record judged dead (two
  starts that both judged it dead cannot both take it); then the ordinary atomic link decides.

Limits, stated: the hosts' clocks must agree within a fraction of STALE_AFTER_S (NTP does this); a
holder on another host that hangs for longer than STALE_AFTER_S without its heartbeat thread running
(a frozen node that later wakes) can be taken over while it lives, and it then says it lost the hold;
two machines that share a host name and a process-id space are not told apart; a lock file that
cannot be read (hand-edited, cut short by a full disk) is never taken over blindly: the start refuses
with a line saying to remove it if no job runs.

This module imports only the standard library, psutil and the config schema, so `scalegpt launch` can
check the hold without importing torch or deepspeed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from omegaconf import OmegaConf

from .config.schema import Config, read_config_file
from .errors import UserError
from .lifeline import process_started
from .osutil import atomic_write

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
SKIPPED = "skipped.json"
FAULTS = "faults.json"
LOCK = "writer.lock"
SBATCH = "sbatch.sh"
CURVES = "curves.png"

HEARTBEAT_S = 10.0
"""How often the holder touches the lock file."""
STALE_AFTER_S = 120.0
"""A holder on another host whose heartbeat is older than this is dead (a lost node)."""


# -- metrics.jsonl ---------------------------------------------------------------------------------------
def metrics_rows(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl's rows, one per step (where a step appears twice, in a file written before runs
    trimmed it, the later row wins), sorted by step; and how many lines could not be read (one being
    written as the file was read, or cut short by a kill). No rows when there is no file."""
    path = run_dir / METRICS
    if not path.is_file():
        return [], 0
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    return [by_step[s] for s in sorted(by_step)], bad


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics_rows for a command that needs some: a UserError when the run has logged nothing."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir} has no {METRICS}; pass a run directory that has trained")
    rows, bad = metrics_rows(run_dir)
    if not rows:
        raise UserError(f"{run_dir / METRICS} holds no metrics yet; plot again once the run has logged a step")
    return rows, bad


def trim_metrics(run_dir: Path, through: int, *, replace: dict[str, Any] | None = None) -> None:
    """Keep only the rows of steps up to `through` (-1: none), atomically, so that the steps a resume or a
    rewind trains again are not logged twice; with `replace`, step `through`'s row is merged with it."""
    path = run_dir / METRICS
    if not path.is_file() and replace is None:
        return
    kept = [row for row in metrics_rows(run_dir)[0] if row["step"] <= through]
    if replace is not None:
        last = kept.pop() if kept and kept[-1]["step"] == through else {}
        kept.append({**last, **replace, "step": through})
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))


# -- the experiment it holds -----------------------------------------------------------------------------
RESUMABLE_CHANGES = (
    "run.dir",
    "train.max_steps",
    "train.micro_batch",
    "train.compile",
    "train.activation_checkpointing",
    "train.overlap_comm",
    "train.contiguous_gradients",
    "train.dist_timeout_minutes",
    "train.on_spike",  # a run that stopped at a spike may continue with a rewind
    "train.spike_",
    "train.inject_fault",
    "train.step_timeout_s",
    "data.num_proc",
    "run.name",
    "checkpoint.",
    "log.",
    "eval.",
)
"""Keys (and key prefixes) that may change between a run directory's first start and a resume; anything
else differing means a different experiment, which belongs in a different run directory."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # sources, stages: name the item
            out.update(_flatten({str(i): x for i, x in enumerate(v)}, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for every setting that differs and may not change on a resume."""
    a = _flatten(OmegaConf.to_container(OmegaConf.structured(old)))  # type: ignore[arg-type]
    b = _flatten(OmegaConf.to_container(OmegaConf.structured(new)))  # type: ignore[arg-type]
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]


def run_dir_differences(run_dir: Path, cfg: Config) -> list[str]:
    """How `cfg` differs from the config a run directory was made with (none when it holds no run yet)."""
    existing = run_dir / CONFIG
    return config_differences(read_config_file(existing), cfg) if existing.is_file() else []


def check_same_experiment(
    run_dir: Path,
    cfg: Config,
    *,
    name: str | None = None,
    fix: str = "use a new run.dir, or remove the old one",
) -> None:
    """A UserError when `run_dir` holds another experiment than `cfg`; `name` (default `run.dir DIR`) and
    `fix` word it for the caller (a ladder rung says what to do with a rung)."""
    diffs = run_dir_differences(run_dir, cfg)
    if diffs:
        what = name or f"run.dir {run_dir}"
        raise UserError(f"{what} was made with a different config ({'; '.join(diffs[:4])}); {fix}")


# -- one writer: the hold ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Holder:
    """Who holds a run directory, as its lock file records it."""

    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch): tells a reused pid apart
    since: float  # when it took the hold
    token: str  # this hold's own id, so a holder never mistakes a later hold for its own
    what: str  # what holds it, for the message ("scalegpt train, rank 0 of 2")

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.what} on host {self.host}, process {self.pid}, since {when}"


def dead_reason(holder: Holder, heartbeat: float, *, host: str | None = None, now: float | None = None) -> str | None:
    """Why `holder` (whose lock file was last touched at `heartbeat`) is dead, or None while it lives."""
    host = host or socket.gethostname()
    if holder.host == host:
        current = process_started(holder.pid)
        if current is None:
            return f"process {holder.pid} is gone"
        if current >= 0 and abs(current - holder.started) >= 1.0:
            return f"process id {holder.pid} now belongs to another process"
        return None
    age = (time.time() if now is None else now) - heartbeat
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {age:.0f} s ago (more than {STALE_AFTER_S:.0f} s: its node is down or lost)"
    return None


def read_holder(run_dir: Path) -> tuple[Holder, float] | None:
    """The holder of `run_dir` and its last heartbeat, None when nobody holds it; a UserError when the lock
    file cannot be read as one (after a moment's grace for a file that O_EXCL made and is still filling)."""
    path = run_dir / LOCK
    for attempt in range(20):
        try:
            heartbeat = path.stat().st_mtime
            return Holder(**json.loads(path.read_text(encoding="utf-8"))), heartbeat
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            if attempt == 19:
                raise UserError(
                    f"{path} is not a scalegpt lock file ({type(exc).__name__}); if no job is running on "
                    f"run.dir {run_dir}, remove {path} and start again"
                ) from exc
            time.sleep(0.05)
    return None  # not reached


def _refusal(run_dir: Path, holder: Holder) -> UserError:
    return UserError(
        f"run.dir {run_dir} is in use by {holder.describe()}; wait for that job to end or stop it, or use "
        "another run.dir (sample, eval, export and plot may read it meanwhile)"
    )


def check_free(run_dir: Path) -> None:
    """A UserError naming the holder when a live job holds `run_dir`; takes nothing (the launcher's check)."""
    found = read_holder(run_dir)
    if found is not None and dead_reason(*found) is None:
        raise _refusal(run_dir, found[0])


class Hold:
    """This process holds a run directory: its lock file is ours, and a thread keeps its heartbeat."""

    def __init__(self, run_dir: Path, holder: Holder, note: str | None, heartbeat_s: float, made: list[Path]) -> None:
        self.run_dir, self.holder, self.note, self.made = run_dir, holder, note, made
        self.path = run_dir / LOCK
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="run-dir-heartbeat", daemon=True)
        self._thread.start()

    def _mine(self) -> bool:
        try:
            found = read_holder(self.run_dir)
        except UserError:
            return False
        return found is not None and found[0].token == self.holder.token

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self._mine():
                self.lost = True
                print(f"scalegpt: warning: lost the hold on run.dir {self.run_dir} to another job", flush=True)
                return
            try:
                os.utime(self.path)
            except OSError:
                continue  # a missed beat; the next one may land

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, if it is still ours; and the folders taking the hold
        made, while they are empty: a start refused after it took the hold leaves no new run directory."""
        self._stop.set()
        self._thread.join()
        if self._mine():
            self.path.unlink(missing_ok=True)
        for folder in self.made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def _publish(run_dir: Path, holder: Holder) -> bool:
    """Create the lock file holding `holder`, atomically; False when it exists."""
    path = run_dir / LOCK
    text = json.dumps(asdict(holder), indent=1) + "\n"
    tmp = run_dir / f".{LOCK}.{holder.token}.tmp"
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(run_dir: Path, stale: Holder) -> None:
    """Move the dead holder's file aside; if what moved is not the record judged dead (another start took
    over in between), put it back, so that the atomic link alone decides who holds the directory."""
    path = run_dir / LOCK
    aside = run_dir / f".{LOCK}.stale.{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(aside.read_text(encoding="utf-8")).get("token")
    except (OSError, ValueError, AttributeError):
        moved = None
    try:
        if moved != stale.token:
            os.link(aside, path)
    except FileExistsError:
        pass
    finally:
        aside.unlink(missing_ok=True)


def take(run_dir: Path, what: str = "scalegpt train", *, heartbeat_s: float = HEARTBEAT_S) -> Hold:
    """Hold `run_dir` for this process, or a UserError naming the live holder. A dead holder is taken over;
    the returned Hold's `note` then says whose hold was taken and why it was dead."""
    made = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    me = Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=psutil.Process().create_time(),
        since=time.time(),
        token=uuid.uuid4().hex,
        what=what,
    )
    note = None
    for _ in range(5):
        if _publish(run_dir, me):
            return Hold(run_dir, me, note, heartbeat_s, made)
        found = read_holder(run_dir)
        if found is None:
            continue  # released between our attempt and the read
        holder, heartbeat = found
        reason = dead_reason(holder, heartbeat)
        if reason is None:
            raise _refusal(run_dir, holder)
        note = f"took over run.dir {run_dir} from {holder.describe()}, which is dead: {reason}"
        _remove_stale(run_dir, holder)
    raise UserError(f"could not take run.dir {run_dir}: other jobs keep taking it; start again once they stop")
