"""Learning-rate and batch-size schedules, expressed in tokens so that they scale with the run
(GPT-3 Appendix B): linear warmup, cosine decay to a floor, and a linear batch-size ramp; and the step
cadence of evaluation, checkpoints and logging."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config.schema import Config
from .config.validation import global_batch
from .errors import UserError


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    warmup_tokens: int
    decay_tokens: int
    min_lr_ratio: float
    ramp_tokens: int
    ramp_start_tokens: int
    full_batch: int  # sequences per optimizer step once the ramp is over
    batch_quantum: int  # the ramp's batch sizes are multiples of this (schedule.ramp_quantum), any world size
    n_ctx: int
    kind: str = "cosine"  # or "wsd": warmup, flat at the peak, then linear decay
    decay_start_tokens: int = 0  # wsd: where the flat peak ends

    @classmethod
    def from_config(cls, cfg: Config, *, world_size: int) -> Schedule:
        return cls(
            peak_lr=cfg.optim.lr,
            warmup_tokens=cfg.schedule.warmup_tokens,
            decay_tokens=cfg.schedule.decay_tokens,
            min_lr_ratio=cfg.schedule.min_lr_ratio,
            ramp_tokens=cfg.schedule.ramp_tokens,
            ramp_start_tokens=cfg.schedule.ramp_start_tokens,
            full_batch=global_batch(cfg, world_size),
            batch_quantum=ramp_quantum(cfg, world_size),
            n_ctx=cfg.model.n_ctx,
            kind=cfg.schedule.kind,
            decay_start_tokens=cfg.schedule.decay_start_tokens,
        )

    def lr(self, tokens: int) -> float:
        """LR for the step that brings the run to `tokens` tokens: linear warmup to the peak, then a decay
        to min_lr_ratio x peak at decay_tokens, then flat at the floor. The cosine decays from the end of
        warmup; wsd stays at the peak until decay_start_tokens and then falls linearly (warmup-stable-decay,
        whose cool-down can start wherever a run's last data stage begins)."""
        floor = self.min_lr_ratio * self.peak_lr
        if self.warmup_tokens and tokens < self.warmup_tokens:
            return self.peak_lr * tokens / self.warmup_tokens
        if tokens >= self.decay_tokens:
            return floor
        if self.kind == "wsd":
            if tokens < self.decay_start_tokens:
                return self.peak_lr
            progress = (tokens - self.decay_start_tokens) / (self.decay_tokens - self.decay_start_tokens)
            return self.peak_lr + (floor - self.peak_lr) * progress
        progress = (tokens - self.warmup_tokens) / max(1, self.decay_tokens - self.warmup_tokens)
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def batch_size(self, tokens: int) -> int:
        """Sequences in the next optimizer step, given `tokens` already trained on: a linear ramp from
        ramp_start_tokens to the full batch over ramp_tokens, rounded down to whole quanta (the micro batch
        stays fixed; gradient accumulation changes)."""
        if not self.ramp_tokens or tokens >= self.ramp_tokens:
            return self.full_batch
        start = self.ramp_start_tokens / self.n_ctx
        seqs = start + (self.full_batch - start) * tokens / self.ramp_tokens
        steps = max(1, int(seqs // self.batch_quantum))
        return min(self.full_batch, steps * self.batch_quantum)


def ramp_quantum(cfg: Config, world_size: int) -> int:
    """schedule.ramp_quantum (0: train.micro_batch), checked against this world size: each ramp batch must
    split into whole micro batches on every rank, and the quantum must not depend on the world size, or a
    ramped run would train on other batches on another number of processes."""
    micro = cfg.train.micro_batch
    quantum = cfg.schedule.ramp_quantum or micro
    if cfg.schedule.ramp_tokens and quantum % (micro * world_size):
        raise UserError(
            f"schedule.ramp_quantum={quantum} is not divisible by train.micro_batch={micro} x world size "
            f"{world_size}; set schedule.ramp_quantum to a multiple of {micro * world_size} (the same value "
            "for every process count the run may resume on)"
        )
    return quantum


@dataclass(frozen=True)
class Cadence:
    """When something periodic is due: every `every` steps (never on a schedule when 0), and at the last
    step when `at_end`. Evaluation, checkpoints and log lines each keep one, so the loop only asks."""

    every: int
    at_end: bool

    def due(self, step: int, *, last: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (last and self.at_end)
