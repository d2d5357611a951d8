"""Surviving a long run: loss-spike detection, the samples a rewind skips, fire drills, and the step watchdog.

What a rewind or a drill decides is kept in the run directory (skipped.json, faults.json), so a resume
after a kill replays the same run: the sample at global index g is a pure function of g, so skipping a
recorded range is exact.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .osutil import atomic_write
from .rundir import FAULTS, SKIPPED

FAULT_KINDS = ("nan", "spike", "crash", "hang")
SPIKE_FACTOR = 1000.0  # how much a spike@STEP drill multiplies that step's loss (and so its gradients)


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int

    @property
    def spec(self) -> str:
        return f"{self.kind}@{self.step}"


def parse_fault(text: str) -> Fault | None:
    """'nan@50' -> Fault('nan', 50); None when it is not KIND@STEP with a known kind and STEP >= 1."""
    match = re.fullmatch(r"\s*(\w+)@(\d+)\s*", text)
    if match is None or match.group(1) not in FAULT_KINDS or int(match.group(2)) < 1:
        return None
    return Fault(match.group(1), int(match.group(2)))


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc}); restore it, or remove it to forget what it records") from exc


class FaultDrill:
    """train.inject_fault: the fault fires once per run directory. Rank 0 records it in RUN/faults.json, so
    neither a rewind (same process) nor a resume (a new one) fires it again.

    When it is recorded matters for a kill -9 in between. A crash or a hang ends the process, so it is
    recorded before it fires. A loss fault that a rewind answers is recorded with the rewind (`record`,
    beside skipped.json): a run killed after the bad step but before the rewind resumes from the
    checkpoint before it, fires it again and rewinds exactly as the uninterrupted run did."""

    def __init__(self, spec: str, run_dir: Path, *, is_main: bool, rewinds: bool = False) -> None:
        self.fault = parse_fault(spec) if spec else None
        self.path, self.is_main, self.rewinds = run_dir / FAULTS, is_main, rewinds
        self.fired: list[str] = list(_read_json(self.path, [])) if self.fault else []

    def due(self, step: int) -> str | None:
        """The kind of fault to fire at `step` (the step about to run), marking it as fired."""
        if self.fault is None or self.fault.step != step or self.fault.spec in self.fired:
            return None
        self.fired.append(self.fault.spec)
        if not (self.rewinds and self.fault.kind in ("nan", "spike")):
            self.record()
        return self.fault.kind

    def record(self) -> None:
        """Write what has fired to RUN/faults.json (rank 0)."""
        if self.is_main and self.fired:
            atomic_write(self.path, json.dumps(self.fired))


@dataclass(frozen=True)
class Skip:
    """One rewind: training went back to `from_step` and skips global samples [start, end), the ones that
    led to the spike at `spike_step`; the LR is multiplied by `lr_factor` up to step `lr_until_step`."""

    from_step: int
    spike_step: int
    start: int
    end: int
    lr_factor: float
    lr_until_step: int


class SkipLog:
    """RUN/skipped.json: every rewind's skipped range, read at every start so a resume skips them too."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SKIPPED
        self.skips = [Skip(**s) for s in _read_json(self.path, [])]

    def add(self, skip: Skip, *, is_main: bool) -> None:
        self.skips.append(skip)
        if is_main:
            atomic_write(self.path, json.dumps([asdict(s) for s in self.skips], indent=1))

    def advance(self, samples: int) -> int:
        """The next sample to train on, from `samples`: past every skipped range that starts there."""
        moved = True
        while moved:
            moved = False
            for s in self.skips:
                if s.start == samples and s.end > samples:
                    samples, moved = s.end, True
        return samples

    def lr_factor(self, step: int) -> float:
        """The product of the LR factors of the rewinds whose lowered-LR window holds `step`."""
        return math.prod(s.lr_factor for s in self.skips if s.from_step < step <= s.lr_until_step)


class Spike(Exception):
    """A step's loss or grad norm is non-finite or far above the running window."""

    def __init__(self, step: int, samples: int, reason: str) -> None:
        super().__init__(f"{reason} at step {step}")
        self.step, self.samples, self.reason = step, samples, reason


@dataclass
class SpikeDetector:
    """Compares each step with the median of the last `window` good steps. A ratio to the median, not a
    z-score: early training's falling loss makes the spread large and a z-score blind, while a spike is a
    jump by a factor. The window is part of the checkpoint (TrainState.window), so a resumed run judges
    its steps exactly as an uninterrupted one."""

    window: int
    loss_ratio: float
    grad_ratio: float
    check_grad: bool  # fp16 skips non-finite-gradient steps itself, by design

    def check(self, history: list[list[float]], loss: float, grad_norm: float | None) -> str | None:
        """Why (loss, grad_norm) is a spike, or None; a good step joins `history` (kept to `window`)."""
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if self.check_grad and grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm became {grad_norm}"
        if len(history) >= self.window:
            loss_median = statistics.median(h[0] for h in history)
            if self.loss_ratio and loss > self.loss_ratio * loss_median:
                return f"loss spiked to {loss:.4g} ({loss / loss_median:.1f}x the median {loss_median:.4g})"
            norms = [h[1] for h in history if math.isfinite(h[1])]
            if self.grad_ratio and grad_norm is not None and norms and math.isfinite(grad_norm):
                norm_median = statistics.median(norms)
                if norm_median > 0 and grad_norm > self.grad_ratio * norm_median:
                    return (
                        f"gradient norm spiked to {grad_norm:.4g} ({grad_norm / norm_median:.1f}x the median "
                        f"{norm_median:.4g})"
                    )
        history.append([loss, math.nan if grad_norm is None else grad_norm])
        del history[: -self.window]
        return None


class Watchdog:
    """Ends the process with a clear error when a step (with its evaluation and save) takes longer than
    `timeout_s`: one process has no collective whose time-out would end a hang, and several processes
    would otherwise wait dist_timeout_minutes."""

    fired = False
    """Set once a watchdog of this process has fired: a collective that then fails because the other ranks'
    watchdogs ended them is part of the same hang, and says nothing more (see peer_lost)."""

    def __init__(self, timeout_s: float, *, speak: bool = True) -> None:
        self.timeout_s = timeout_s
        self.speak = speak
        self._deadline = math.inf
        self._step = 0
        self._lock = threading.Lock()
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def beat(self, step: int) -> None:
        """Step `step` is about to start: it has `timeout_s` from now."""
        with self._lock:
            self._step, self._deadline = step, time.monotonic() + self.timeout_s

    def pause(self) -> None:
        with self._lock:
            self._deadline = math.inf

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                late, step = time.monotonic() > self._deadline, self._step
            if late:
                Watchdog.fired = True
                if not self.speak:  # every rank's watchdog fires together; rank 0's line is the job's one
                    time.sleep(2)  # and it goes first, so that no rank reads its exit as a peer lost
                    os._exit(3)
                print(
                    f"scalegpt: error: step {step} made no progress for {self.timeout_s:g} s "
                    "(train.step_timeout_s): a hung rank, collective or data read; the last checkpoint is "
                    "intact, so run the same command again to resume",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank of the job is gone (killed, crashed,
    or ended by its watchdog): gloo reports it as a RuntimeError or DistError naming its transport."""
    import torch.distributed as dist  # here: recovery is imported by processes that never use torch.distributed

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))


def say_peer_lost(exc: BaseException, rank: int) -> int:
    """One line instead of the collective's traceback: the rank that died has said (or could not say) why,
    and this one only lost it. Exit 3 as the watchdog does when that is what ended the job."""
    if Watchdog.fired:
        return 3
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)[:160]  # gloo's source location, then its words
    print(
        f"scalegpt: error: rank {rank} stopped because another rank of this job stopped ({reason}); that rank's "
        "output says why. The last checkpoint is intact: run the same command again to resume",
        file=sys.stderr,
        flush=True,
    )
    return 1
