"""Reliability figures, measured the way a user meets the faults: kill -9s survived, concurrent starts
refused, bad inputs that end cleanly. Every run is the real `scalegpt` command in its own process.

    python bench/reliability.py                 # the full sweep (about half an hour on 2 busy cores)
    python bench/reliability.py --quick         # one of each, a few minutes
    python bench/reliability.py --json out.json

1. Kills survived: for each setting, kill -9 a run at a seeded random moment (after a random logged step,
   plus a random part of a step), run the same command again until it finishes, and compare its
   metrics.jsonl with an uninterrupted run of the same setting: every logged loss, val_loss, lr and
   grad_norm bit for bit, and one row per step. After a kill of `scalegpt launch`'s process group, every
   process it had started must be gone within 10 s.
2. Concurrent starts: two `train`s at once on one new run.dir, and a `train` beside a `launch --procs 2`:
   exactly one may train, and the other must exit 2 with one `scalegpt: error:` line naming the holder.
   And a holder killed with -9 must not block the next start.
3. Bad input: tests/test_bad_input.py, every tier; each case is a bad input that must give one error line,
   exit 2 and change nothing.

A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# tests/e2e.py's smaller built-in corpus: preparing it takes seconds.
SMALL_DATA = ["data.sources.0.builtin_mb=0.4", "data.sources.1.builtin_mb=0.3", "data.sources.2.builtin_mb=0.4"]
# Eight sequences a step (two micro batches on one process, one on each of two), a validation every 4 steps.
BASE = [
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.max_steps=8",
    "checkpoint.every=3",
    "log.every=1",
    "eval.every=4",
    "eval.batches=1",
]
COMPARED = ("loss", "val_loss", "lr", "grad_norm")
RANKS_GONE_S = 10.0


@dataclass(frozen=True)
class Setting:
    name: str
    procs: int
    overrides: tuple[str, ...]
    kill_after: tuple[int, int]
    """The kill comes after a step drawn from this range (inclusive), plus a random part of a step."""


SETTINGS = [
    Setting("one process (`train`)", 1, (), (1, 7)),
    Setting("two processes (`launch --procs 2`)", 2, (), (1, 7)),
    Setting(
        "mid batch-ramp (batch 4 to 16 in 6 steps)",
        1,
        (
            "train.micro_batch=2",
            "train.global_batch=16",
            "schedule.ramp_tokens=3000",
            "schedule.ramp_start_tokens=256",
            "schedule.ramp_quantum=4",
            "train.max_steps=6",
        ),
        (1, 5),
    ),
    Setting(
        "rewind fire drill (`nan@5`, `rewind`)",
        1,
        ("checkpoint.every=2", "train.inject_fault=nan@5", "train.on_spike=rewind"),
        (1, 7),
    ),
    Setting("before the first checkpoint", 1, ("checkpoint.every=1000",), (1, 7)),
]


# -- running scalegpt ----------------------------------------------------------------------------------
class Job:
    """`python -m scalegpt ARGS` in the background, in its own process group as a shell job is, its output in
    a file (a pipe nobody reads would stop it once full)."""

    def __init__(self, log: Path, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RANK", None)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scalegpt", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout=timeout)


def command(setting_procs: int, run: Path, data: Path, overrides: tuple[str, ...] | list[str]) -> list[str]:
    common = [f"run.dir={run}", f"data.dir={data}", *SMALL_DATA, *BASE, *overrides]
    if setting_procs == 1:
        return ["train", SMOKE, *common]
    return ["launch", SMOKE, "--procs", str(setting_procs), *common]  # the launcher picks a free port


def raw_rows(run: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl as written, every line (duplicates kept), and how many lines did not parse."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


def last_step(run: Path) -> int:
    rows, _ = raw_rows(run)
    return rows[-1]["step"] if rows else -1


def running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan that exited waits for whatever PID 1 this machine has to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- 1. kills survived --------------------------------------------------------------------------------
@dataclass
class Kill:
    setting: str
    after_step: int
    delay_s: float
    killed_at_step: int
    checkpoint_at_kill: str | None
    reruns: list[int]
    bit_for_bit: bool
    one_row_per_step: bool
    processes_killed: int = 0
    survivors_after_10s: int = 0
    ranks_gone_s: float | None = None
    detail: str = ""
    landed: bool = True
    """False when the run ended before the kill came: no kill to survive."""

    @property
    def survived(self) -> bool:
        return (
            self.landed
            and self.bit_for_bit
            and self.one_row_per_step
            and self.reruns[-1:] == [0]
            and not self.survivors_after_10s
        )


def compare(run: Path, ref_rows: list[dict[str, Any]]) -> tuple[bool, bool, str]:
    rows, bad = raw_rows(run)
    steps = [r["step"] for r in rows]
    one_per_step = bad == 0 and steps == [r["step"] for r in ref_rows] and len(steps) == len(set(steps))
    diffs = []
    by_step = {r["step"]: r for r in rows}
    for ref in ref_rows:
        got = by_step.get(ref["step"], {})
        diffs += [
            f"step {ref['step']} {k}: {got.get(k)!r} != {ref.get(k)!r}" for k in COMPARED if got.get(k) != ref.get(k)
        ]
    detail = "; ".join(diffs[:3])
    if not one_per_step:
        detail = f"steps {steps} ({bad} unreadable lines) against {[r['step'] for r in ref_rows]}; " + detail
    return not diffs, one_per_step, detail


def checkpoint_name(run: Path) -> str | None:
    latest = run / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def kill_once(
    setting: Setting, data: Path, work: Path, ref_rows: list[dict[str, Any]], rng: random.Random, step_s: float
) -> Kill:
    run = work / "run"
    args = command(setting.procs, run, data, setting.overrides)
    after = rng.randint(*setting.kill_after)
    delay = rng.uniform(0, step_s)
    job = Job(work / "killed.log", args)
    deadline = time.monotonic() + 600
    while last_step(run) < after and job.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    processes = psutil.Process(job.pid).children(recursive=True) if job.proc.poll() is None else []
    finished_first = job.proc.poll() is not None
    killed_at = last_step(run)
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended before the kill: counted, with its exit status, below
        pass
    first_code = job.finish()
    gone_s, survivors = None, 0
    if setting.procs > 1:
        t0 = time.monotonic()
        while (alive := [p for p in processes if running(p)]) and time.monotonic() - t0 < RANKS_GONE_S:
            time.sleep(0.05)
        survivors = len(alive)
        gone_s = None if alive else time.monotonic() - t0
        for p in alive:  # leave nothing behind for the next trial
            p.kill()
    at_kill = checkpoint_name(run)
    reruns = []
    for attempt in range(3):  # the same command again, until it finishes
        again = Job(work / f"rerun{attempt}.log", command(setting.procs, run, data, setting.overrides))
        reruns.append(again.finish())
        if reruns[-1] == 0:
            break
    bit, once, detail = compare(run, ref_rows)
    if finished_first:
        detail = f"the run ended before the kill, exit {first_code}: {job.output()[-300:]!r}; " + detail
    if reruns[-1] != 0:
        detail += f"; rerun exited {reruns[-1]}: {again.output()[-500:]}"
    return Kill(
        setting.name,
        after,
        round(delay, 3),
        killed_at,
        at_kill,
        reruns,
        bit,
        once,
        len(processes),
        survivors,
        gone_s,
        detail,
        landed=not finished_first,
    )


def kills(data: Path, tmp: Path, n: int, seed: int, only: list[str]) -> tuple[list[Kill], dict[str, float]]:
    rng = random.Random(seed)
    results: list[Kill] = []
    walls: dict[str, float] = {}
    for i, setting in enumerate(SETTINGS):
        if only and not any(word in setting.name for word in only):
            continue
        t0 = time.monotonic()
        ref = tmp / f"ref{i}"
        ref.mkdir()
        code = Job(ref / "log", command(setting.procs, ref / "run", data, setting.overrides)).finish()
        if code != 0:
            raise SystemExit(
                f"the uninterrupted run of {setting.name} exited {code}:\n{(ref / 'log').read_text()[-3000:]}"
            )
        ref_rows, _ = raw_rows(ref / "run")
        # A typical step, not the mean: a rewind's reload or an evaluation would stretch a mean past the
        # last steps of a run, and the kill would come after it had finished.
        times = [r["elapsed_s"] for r in ref_rows if r.get("elapsed_s")]
        step_s = statistics.median(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else 1.0
        for k in range(n):
            work = tmp / f"kill{i}-{k}"
            work.mkdir()
            result = kill_once(setting, data, work, ref_rows, rng, step_s)
            results.append(result)
            print(
                f"  {setting.name}: kill {k + 1}/{n} {'survived' if result.survived else 'FAILED'} {result.detail}",
                flush=True,
            )
        walls[setting.name] = time.monotonic() - t0
    return results, walls


# -- 2. concurrent starts -----------------------------------------------------------------------------
@dataclass
class Trial:
    kind: str
    codes: list[int]
    clean: bool
    detail: str = ""


# A plain train's holder is its own process; a launched job's is its rank 0 ("scalegpt train, rank 0 of 2").
HOLDER = re.compile(r"run\.dir \S+ is in use by scalegpt train(, rank 0 of 2)? on host (\S+), process (\d+), since ")


def judge_pair(kind: str, jobs: list[Job], run: Path) -> Trial:
    codes = [job.finish() for job in jobs]
    if sorted(codes) != [0, 2]:
        late = [i for i, job in enumerate(jobs) if "nothing to do" in job.output()]
        why = f"; job {late[0]} started after the other had finished (no overlap)" if late else ""
        return Trial(kind, codes, False, f"exit codes {codes}{why}")
    winner = jobs[codes.index(0)]
    refused = jobs[codes.index(2)].output()
    lines = [line for line in refused.splitlines() if line.startswith("scalegpt: error:")]
    found = HOLDER.search(lines[0]) if len(lines) == 1 else None
    problems = []
    if found is None:
        problems.append(f"error lines {lines}")
    elif found[2] != socket.gethostname() or (winner.proc.args[3] == "train") != (found[1] is None):
        problems.append(f"named {found[0]!r}, the winner was `{winner.proc.args[3]}`")
    elif winner.proc.args[3] == "train" and int(found[3]) != winner.pid:
        problems.append(f"named {found[0]!r}, the winner was process {winner.pid}")
    if "Traceback" in refused:
        problems.append("a traceback")
    rows, bad = raw_rows(run)
    steps = [r["step"] for r in rows]
    if bad or steps != sorted(set(steps)) or len({r["world_size"] for r in rows}) != 1:
        problems.append(f"metrics steps {steps}, world sizes {sorted({r['world_size'] for r in rows})}")
    if (run / "writer.lock").exists():
        problems.append("writer.lock left behind")
    return Trial(kind, codes, not problems, "; ".join(problems))


def concurrent(data: Path, tmp: Path, m: int) -> list[Trial]:
    # Long enough that the `train` is still running when the `launch`'s ranks, slower to start, check the hold.
    short = ("train.max_steps=16", "eval.every=0", "checkpoint.every=8")
    trials = []
    for k in range(m):
        run = tmp / f"two-trains-{k}" / "run"
        run.parent.mkdir()
        args = command(1, run, data, short)
        jobs = [Job(run.parent / f"{i}.log", args) for i in range(2)]
        trials.append(judge_pair("two `train`s at once", jobs, run))
    for k in range(m):
        run = tmp / f"train-launch-{k}" / "run"
        run.parent.mkdir()
        jobs = [Job(run.parent / "train.log", command(1, run, data, short))]
        jobs.append(Job(run.parent / "launch.log", command(2, run, data, short)))
        trials.append(judge_pair("a `train` beside a `launch --procs 2`", jobs, run))
    for k in range(m):
        run = tmp / f"dead-holder-{k}" / "run"
        run.parent.mkdir()
        args = command(1, run, data, ("train.max_steps=6", "checkpoint.every=1000", "eval.every=0"))
        first = Job(run.parent / "first.log", args)
        while last_step(run) < 2 and first.proc.poll() is None:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.finish()
        held = (run / "writer.lock").is_file()
        again = Job(run.parent / "again.log", args)
        code = again.finish()
        out = again.output()
        steps = [r["step"] for r in raw_rows(run)[0]]
        took_over = f"process {first.pid}" in out and "took over" in out
        ok = held and code == 0 and took_over and steps == list(range(1, 7))
        detail = "" if ok else f"lock held after kill: {held}, exit {code}, took over: {took_over}, steps {steps}"
        trials.append(Trial("a holder killed with -9, then the next start", [code], ok, detail))
    return trials


# -- 3. bad input -------------------------------------------------------------------------------------
def bad_input(tmp: Path, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp / 'pytest'}"]
    cmd += ["-m", "not slow"] if quick else []
    t0 = time.monotonic()
    proc = subprocess.run([*cmd, "tests/test_bad_input.py"], cwd=ROOT, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"summary": summary, "counts": counts, "failed": failed, "wall_s": round(time.monotonic() - t0, 1)}


# -- report -------------------------------------------------------------------------------------------
@dataclass
class Report:
    date: str
    commit: str
    seed: int
    kills: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    bad_input: dict[str, Any] = field(default_factory=dict)
    walls_s: dict[str, float] = field(default_factory=dict)


def table(kill_results: list[Kill], trials: list[Trial], bad: dict[str, Any]) -> str:
    lines = ["| figure | setting | result |", "|---|---|---|"]
    for setting in SETTINGS:
        mine = [k for k in kill_results if k.setting == setting.name]
        if not mine:
            continue
        survived = sum(k.survived for k in mine)
        note = (
            f"{sum(k.bit_for_bit for k in mine)} bit for bit, {sum(k.one_row_per_step for k in mine)} one row per step"
        )
        if setting.procs > 1:
            gone = [k.ranks_gone_s for k in mine if k.ranks_gone_s is not None]
            note += f"; ranks gone within 10 s after {len(gone)} of {len(mine)} kills"
            if gone:
                note += f" (at most {max(gone):.1f} s)"
        lines.append(f"| kills survived | {setting.name} | {survived} of {len(mine)} ({note}) |")
    for kind in dict.fromkeys(t.kind for t in trials):
        mine = [t for t in trials if t.kind == kind]
        lines.append(f"| concurrent starts | {kind} | {sum(t.clean for t in mine)} of {len(mine)} clean |")
    if not bad:
        return "\n".join(lines)
    c = bad.get("counts", {})
    total = sum(c.get(k, 0) for k in ("passed", "failed", "error", "errors"))
    lines.append(
        f"| cases clean | tests/test_bad_input.py | {c.get('passed', 0)} of {total} pass ({bad.get('summary', '')}) |"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="one kill per setting, one trial of each start, fast bad-input tier"
    )
    p.add_argument("--kills", type=int, default=6, help="kill -9s per setting (default 6)")
    p.add_argument("--trials", type=int, default=5, help="trials of each concurrent start (default 5)")
    p.add_argument("--seed", type=int, default=26)
    p.add_argument("--json", type=Path, help="also write every result to this file")
    p.add_argument(
        "--workdir", type=Path, help="keep every run and log here (new or empty) instead of a temporary folder"
    )
    p.add_argument(
        "--settings", nargs="*", default=[], help="only the kill settings whose names hold one of these words"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["kills", "concurrent", "bad-input"])
    args = p.parse_args()
    n, m = (1, 1) if args.quick else (args.kills, args.trials)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    report = Report(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit, args.seed)
    kill_results: list[Kill] = []
    trials: list[Trial] = []
    bad: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scalegpt-reliability-") as name:
        tmp = Path(name) if args.workdir is None else args.workdir
        tmp.mkdir(parents=True, exist_ok=True)
        data = tmp / "data"
        t0 = time.monotonic()
        prep = subprocess.run(
            [sys.executable, "-m", "scalegpt", "prepare", SMOKE, f"data.dir={data}", *SMALL_DATA],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if prep.returncode != 0:
            raise SystemExit(f"prepare failed:\n{prep.stderr[-3000:]}")
        if "kills" not in args.skip:
            print(f"kills survived: {n} per setting", flush=True)
            kill_results, walls = kills(data, tmp, n, args.seed, args.settings)
            report.walls_s.update(walls)
        if "concurrent" not in args.skip:
            print(f"concurrent starts: {m} trials of each", flush=True)
            t1 = time.monotonic()
            trials = concurrent(data, tmp, m)
            report.walls_s["concurrent starts"] = time.monotonic() - t1
        if "bad-input" not in args.skip:
            print("cases clean: tests/test_bad_input.py", flush=True)
            bad = bad_input(tmp, args.quick)
            report.walls_s["bad input"] = bad["wall_s"]
        report.walls_s["total"] = time.monotonic() - t0
    report.kills = [{**asdict(k), "survived": k.survived} for k in kill_results]
    report.trials = [asdict(t) for t in trials]
    report.bad_input = bad
    report.walls_s = {k: round(v, 1) for k, v in report.walls_s.items()}
    print(f"\n# {report.date}, commit {commit}, seed {args.seed}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(table(kill_results, trials, bad))
    for k in kill_results:
        if not k.survived:
            print(f"FAILED kill: {k.setting}, after step {k.after_step} + {k.delay_s} s: {k.detail}")
    for t in trials:
        if not t.clean:
            print(f"FAILED trial: {t.kind}: {t.detail}")
    for line in bad.get("failed", []):
        print(line)
    print("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.walls_s.items()))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")


if __name__ == "__main__":
    main()
