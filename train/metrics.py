"""What training reports: the steps' figures, read from the device once per logged step; metrics.jsonl
(one object per step) and optional wandb on rank 0; and rank 0's console lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..model.flops import mfu
from .config.schema import Config, to_yaml
from .evaluation.report import epochs_elapsed
from .recovery import Spike, SpikeDetector
from .rundir import METRICS, trim_metrics
from .schedule import Cadence

if TYPE_CHECKING:
    from .data.mixture import Mixture


class MetricsLog:
    """Appends one JSON object per step to RUN/metrics.jsonl; mirrors them to wandb when enabled.
    Only rank 0 constructs one; other ranks hold None."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.run_dir, self.path = run_dir, run_dir / METRICS
        self._file = open(self.path, "a", buffering=1)
        self._wandb: Any = None
        if cfg.log.wandb:
            self._wandb = _start_wandb(run_dir, cfg)

    def truncate(self, through: int, *, replace: dict[str, Any] | None = None) -> None:
        """Keep only the rows of steps up to `through` (-1: none), so that no step is logged twice when a
        resume or a rewind trains steps again; with `replace`, that step's row is merged with it."""
        self._file.close()
        trim_metrics(self.run_dir, through, replace=replace)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self._wandb is not None and rows:
            import wandb

            cols = list(rows[0])
            self._wandb.log({name: wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, cfg: Config) -> Any:
    """wandb in offline mode when no API key is configured: it never prompts and never blocks."""
    import wandb

    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    from omegaconf import OmegaConf

    return wandb.init(
        project=cfg.log.wandb_project,
        name=cfg.run.name or run_dir.name,
        dir=str(run_dir),
        config=OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))),
        resume="allow",
        settings=wandb.Settings(silent=True),
    )


class Console:
    """Rank 0's voice; the other ranks stay quiet. Lines go through the progress bar when one is shown,
    so the bar stays below them."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self._bar: Any = None

    def print(self, line: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def show_progress(self, *, total: int, initial: int) -> None:
        """A live bar on rank 0, only on a terminal: a log file would fill with redraws."""
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def status(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class PendingStep:
    """One optimizer step's figures, left on the device until the next logged step reads them."""

    step: int
    tokens: int
    samples: int  # global sample index after this step: a rewind skips the samples up to it
    lr: float
    loss: torch.Tensor  # this rank's mean loss over the step's micro batches, 0-dim float32
    grad_norm: torch.Tensor | float | None  # DeepSpeed's global norm; a float (inf) after an overflow
    elapsed_s: float
    drawn: dict[str, int] = field(default_factory=dict)  # samples per source, counted on the host


@dataclass(frozen=True)
class SyncedStep:
    """A pending step as the host sees it: the loss averaged over ranks."""

    pending: PendingStep
    loss: float
    grad_norm: float | None


class StepLog:
    """Collects every step's figures and reports them on logged steps. Reading a device value makes the
    host wait for the device, so unlogged steps read nothing, and a logged step reads everything queued
    since the last one with one all-reduce (every rank's losses and stop flag) and one copy to the host."""

    def __init__(
        self,
        cfg: Config,
        *,
        world_size: int,
        console: Console,
        metrics: MetricsLog | None,
        mixture: Mixture,
        peak_flops: float | None,
    ) -> None:
        self.cfg, self.world_size, self.console, self.metrics, self.mixture = cfg, world_size, console, metrics, mixture
        self.peak_flops = peak_flops
        self.cadence = Cadence(cfg.log.every, at_end=True)
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None
        self.last_loss = float("nan")
        self.detector = SpikeDetector(
            window=cfg.train.spike_window,
            loss_ratio=cfg.train.spike_loss_ratio,
            grad_ratio=cfg.train.spike_grad_ratio,
            check_grad=cfg.train.precision != "fp16",
        )
        self.history: list[list[float]] = []  # the detector's window: the run state's, kept in checkpoints
        self._judged = cfg.train.on_spike == "skip"  # then every step was judged before its update
        self._events: dict[int, dict[str, Any]] = {}
        self._pending: list[PendingStep] = []
        self._synced: list[SyncedStep] = []
        self.start(tokens=0)

    def should_log(self, step: int, *, last: bool) -> bool:
        return self.cadence.due(step, last=last)

    def start(self, *, tokens: int) -> None:
        """Start the clocks: elapsed time and the throughput window count from here."""
        self._t0 = self._window_t = time.perf_counter()
        self._window_tokens = tokens

    def record(
        self,
        *,
        step: int,
        tokens: int,
        samples: int,
        lr: float,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | float | None,
    ) -> None:
        elapsed = time.perf_counter() - self._t0
        self._pending.append(PendingStep(step, tokens, samples, lr, loss, grad_norm, elapsed))

    def drawn(self, counts: dict[str, int]) -> None:
        """Samples per source in the step just recorded, counted from its sample indices on the host (no
        device sync); metrics.jsonl records them as drawn/<source>."""
        self._pending[-1].drawn = counts

    def mark(self, step: int, event: dict[str, Any]) -> None:
        """An event (a skipped update) that joins step `step`'s row."""
        self._events[step] = event

    def discard(self) -> None:
        """Forget the steps not yet reported: a rewind abandons them."""
        self._pending.clear()
        self._synced.clear()
        self._events.clear()

    def sync(self, stop_signal: int) -> bool:
        """Every pending step's loss (averaged over ranks) and grad norm on the host, and whether any rank
        received a stop signal: one all-reduce, then one device-to-host copy. That copy waits for the
        device, so the throughput window closes after it."""
        device = self._pending[-1].loss.device
        flag = torch.full((), float(stop_signal), device=device)  # a fill, not a copy from the host
        summed = torch.stack([p.loss for p in self._pending] + [flag])
        dist.all_reduce(summed)  # every rank then sees the same stop decision, at the same step
        norms = torch.stack([_on_device(p.grad_norm, device) for p in self._pending])
        host = torch.cat([(summed[:-1] / self.world_size).double(), summed[-1:].double(), norms]).tolist()
        n = len(self._pending)
        losses, stop, grad_norms = host[:n], host[n] > 0, host[n + 1 :]
        for p, loss, gnorm in zip(self._pending, losses, grad_norms, strict=True):
            self._synced.append(SyncedStep(p, loss, None if p.grad_norm is None else gnorm))
        self._pending.clear()
        self._close_window()
        return stop

    def _close_window(self) -> None:
        now, tokens = time.perf_counter(), self._synced[-1].pending.tokens
        self.tokens_per_sec = (tokens - self._window_tokens) / max(now - self._window_t, 1e-9)
        if self.peak_flops:
            self.mfu = mfu(self.tokens_per_sec, self.cfg.model, self.peak_flops * self.world_size)
        self._window_t, self._window_tokens = now, tokens

    def report(self, evaluation: dict[str, Any] | None = None) -> None:
        """Write the synced steps (rank 0) and print the latest; `evaluation` belongs to the latest step.
        A spike (a non-finite loss or grad norm, or a jump above the running window) raises Spike on every
        rank (they all read the same figures), after the steps before it are written."""
        for i, s in enumerate(self._synced):
            event = self._events.pop(s.pending.step, {})
            # Without DeepSpeed's per-step overflow check (off for bf16 and fp32), a non-finite gradient would
            # reach the weights with a finite loss; fp16 keeps the check and skips such steps by design.
            reason = None if self._judged else self.detector.check(self.history, s.loss, s.grad_norm)
            if reason is not None:
                self._synced.clear()
                raise Spike(s.pending.step, s.pending.samples, reason)
            if self.metrics is not None:
                record: dict[str, Any] = {
                    "step": s.pending.step,
                    "tokens": s.pending.tokens,
                    "loss": s.loss,
                    "lr": s.pending.lr,
                    "grad_norm": s.grad_norm,
                    "tokens_per_sec": self.tokens_per_sec,
                    "mfu": self.mfu,
                    "world_size": self.world_size,
                    "elapsed_s": round(s.pending.elapsed_s, 3),
                }
                record.update(evaluation if evaluation and i == len(self._synced) - 1 else {})
                record.update(epochs_elapsed(self.mixture, s.pending.tokens))
                record.update({f"drawn/{name}": n for name, n in s.pending.drawn.items()})
                record.update(event)
                self.metrics.write(record)
        latest = self._synced[-1]
        self._synced.clear()
        self.last_loss = latest.loss
        self._print(latest.pending, evaluation)

    def _print(self, p: PendingStep, evaluation: dict[str, Any] | None) -> None:
        tps = self.tokens_per_sec or 0.0
        line = f"step {p.step}/{self.cfg.train.max_steps} loss {self.last_loss:.4f} lr {p.lr:.2e} {tps:,.0f} tok/s"
        if evaluation:
            line += f" | {_val_text(evaluation)}"
        self.console.status(f"loss {self.last_loss:.3f} lr {p.lr:.1e} {tps:,.0f} tok/s")
        self.console.print(line)

    def baseline(self, evaluation: dict[str, Any]) -> None:
        """Step 0: validation of the untrained model, so every curve starts from it."""
        if self.metrics is not None:
            record = dict.fromkeys(("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"))
            self.metrics.write(
                {"step": 0, "tokens": 0, **record, "world_size": self.world_size, "elapsed_s": 0.0, **evaluation}
            )
        self.console.print(f"step 0/{self.cfg.train.max_steps} | {_val_text(evaluation)}")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _val_text(evaluation: dict[str, Any]) -> str:
    """The mixture's validation figures for a log line, naming the sources they leave out."""
    text = f"val_loss {evaluation['val_loss']:.4f} val_bpb {evaluation['val_bpb']:.3f}"
    left_out = evaluation.get("val_left_out")
    return f"{text} (without {left_out.replace(',', ', ')})" if left_out else text


def _on_device(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """A grad norm as a float64 scalar on `device`, without a host-to-device copy that would wait."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.full((), math.nan if value is None else float(value), dtype=torch.float64, device=device)
