"""Which global samples each optimizer step trains on, and which rank reads which. The trainer and
`scalegpt inspect` both call rank_indices, so what inspect reports is what a run trains on.

Steps are numbered as metrics.jsonl numbers them: step k is the k-th optimizer step. A run that skipped
samples (a rewind past a loss spike, recorded in RUN/skipped.json) moves each step's first sample past
them with the trainer's own SkipLog.advance; the schedule's token count (which sets the batch size and
the learning rate) counts only the samples trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from ..schedule import Schedule


def rank_indices(start: int, batch: int, *, micro_batch: int, world_size: int, rank: int) -> list[int]:
    """This rank's sample indices for the step whose global batch is samples start..start+batch-1. Row
    (m*W + r)*micro + i of the global batch goes to rank r's micro step m, so any world size sees the same
    global batch, in the same micro batches per rank."""
    gas = batch // (micro_batch * world_size)
    return [start + (m * world_size + rank) * micro_batch + i for m in range(gas) for i in range(micro_batch)]


@dataclass(frozen=True)
class StepSpan:
    """One optimizer step's global batch: samples start..start+size-1."""

    step: int
    start: int
    size: int


def step_spans(
    schedule: Schedule,
    first: int,
    stop: int,
    advance: Callable[[int], int] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    every: int = 0,
) -> list[StepSpan]:
    """The global batches of steps first..stop-1, as the trainer walks them: each step's batch size comes
    from the schedule at the tokens trained so far, and its samples follow the previous step's, moved
    past any skipped range by `advance` (the run's SkipLog.advance). Without `advance` the walk starts at
    `first` from the schedule's totals; with it, at step 1, and `progress(step, stop)` hears of it every
    `every` steps, since a long walk takes a while."""
    if not 1 <= first <= stop:
        raise UserError(f"steps are numbered from 1, as in metrics.jsonl; got {first}:{stop}")
    begin, samples, tokens = 1, 0, 0
    if advance is None:  # nothing skipped: jump straight to the first step asked for
        before = schedule.totals(first - 1)
        begin, samples, tokens = first, before.samples, before.tokens
    out = []
    for step in range(begin, stop):
        if progress is not None and every and step % every == 0:
            progress(step, stop)
        samples = advance(samples) if advance is not None else samples
        batch = schedule.batch_size(tokens)
        if step >= first:
            out.append(StepSpan(step, samples, batch))
        samples += batch
        tokens += batch * schedule.n_ctx
    return out
