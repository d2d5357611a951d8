"""`scalegpt ladder CONFIG --lr-sweep LR1,LR2,...`: learning-rate transfer, the μP paper's Figure 1 in
miniature. The sweep is an axis of the ladder over optim.lr (plan.py's parse_sweep): every rung trains at every
learning rate, as an ordinary rung (resumable, skipped once finished), and each width's rungs share one
learning rate whatever their width, so the ladder's width rule (--lr-exponent) is off. This module reads
the finished rungs: the best learning rate per width, the table that prints it, and the figure of final
loss against learning rate, one curve per width. Under μP the curves' minima should line up; under the
standard parametrization they move to smaller learning rates as the model widens.

It also holds the sweep to two criteria: transfer (every width's best is the same grid point
or the next) and the predictive check (the learning rate picked on the two narrowest widths, trained at
the widest, ends within 1% of the widest width's best), so a sweep says whether tuning small would
have been enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from .results import Outcome

SWEEP_PNG = "lr_sweep.png"


@dataclass(frozen=True)
class Best:
    """One width's best finished rung."""

    name: str
    d_model: int
    lr: float
    val_loss: float
    tried: int
    """Finished learning rates at this width."""

    def to_json(self) -> dict[str, Any]:
        return vars(self)


def best_lrs(outcomes: list[Outcome]) -> list[Best]:
    """Per width (rung shape), the learning rate whose finished rung has the lowest final validation loss."""
    by_shape: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.finished:
            by_shape.setdefault(o.info.name, []).append(o)
    out = []
    for name, group in by_shape.items():
        win = min(group, key=lambda o: o.val_loss or math.inf)
        out.append(Best(name, win.info.d_model, win.info.lr, float(win.val_loss or math.nan), len(group)))
    return sorted(out, key=lambda b: b.d_model)


PREDICT_TOLERANCE = 0.01
"""The predictive check passes when the widest width, trained at the learning rate picked on the two
narrowest, ends within 1% of the best final loss the sweep found at that width: tuning small was enough."""


@dataclass(frozen=True)
class Transfer:
    """The criterion for learning-rate transfer: every width's best learning rate is the same grid point,
    or the next one. Here: the best's positions on the swept grid span at most one step, so every
    width's best is within one grid point of every other's."""

    grid: list[float]
    best: dict[str, float]
    """Each width's best learning rate, narrowest first."""
    spread: int
    """The largest grid position of a best learning rate minus the smallest (0: the same point at every width)."""

    @property
    def holds(self) -> bool:
        return self.spread <= 1

    def to_json(self) -> dict[str, Any]:
        return {"grid": self.grid, "best": self.best, "spread": self.spread, "holds": self.holds}


def lr_transfer(best: list[Best], grid: list[float]) -> Transfer | None:
    """None below two widths, where nothing can move."""
    if len(best) < 2:
        return None
    where = [grid.index(b.lr) for b in best]
    return Transfer(grid=grid, best={b.name: b.lr for b in best}, spread=max(where) - min(where))


@dataclass(frozen=True)
class Prediction:
    """The predictive check (tune small, train big once), from the sweep's own rungs: the learning rate is
    picked on the two narrowest widths alone, as a user tuning small models would pick it, and the widest
    width's rung at that learning rate is the run "trained once with it"; the rest of its row says how
    good the pick was.

    The pick is the grid point with the lowest mean final validation loss over the two narrowest widths
    (among the learning rates finished at both; a tie goes to the smaller). A grid point, not an average
    of the two widths' best learning rates, so that the widest model's run at it is one the sweep trains."""

    picked_at: list[str]
    lr: float
    picked_loss: float
    """The two narrowest widths' mean final loss at `lr`."""
    widest: str
    loss: float | None
    """The widest width's final loss at `lr`; None until that rung finishes."""
    best_lr: float | None
    best_loss: float | None
    """The widest width's best finished rung."""
    settled: bool
    """Whether every learning rate has finished at the widest width, so that its best can no longer fall."""

    @property
    def gap(self) -> float | None:
        """loss / best_loss - 1: 0.004 is 0.4% above the best."""
        if self.loss is None or not self.best_loss:
            return None
        return self.loss / self.best_loss - 1

    @property
    def passed(self) -> bool | None:
        """None until the widest width's row has finished."""
        if not self.settled or self.gap is None:
            return None
        return self.gap <= PREDICT_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "gap": self.gap, "tolerance": PREDICT_TOLERANCE, "passed": self.passed}


def widths_in_order(outcomes: list[Outcome]) -> list[str]:
    """The sweep's rung shapes, planned or finished, narrowest first (deeper first breaks a tie of widths)."""
    shapes = sorted({(o.info.d_model, o.info.params, o.info.name) for o in outcomes})
    return list(dict.fromkeys(name for _, _, name in shapes))


def predict(outcomes: list[Outcome], best: list[Best]) -> Prediction | None:
    """None with fewer than three widths (the two to pick at and a wider one) or before the two narrowest
    share a finished learning rate."""
    names = widths_in_order(outcomes)
    if len(names) < 3:
        return None
    small, widest = names[:2], names[-1]
    loss = {(o.info.name, o.info.lr): float(o.val_loss) for o in outcomes if o.finished and o.val_loss is not None}
    lrs = sorted({o.info.lr for o in outcomes})
    shared = [lr for lr in lrs if all((n, lr) in loss for n in small)]
    if not shared:
        return None
    lr = min(shared, key=lambda v: sum(loss[n, v] for n in small) / len(small))
    top = next((b for b in best if b.name == widest), None)
    return Prediction(
        picked_at=small,
        lr=lr,
        picked_loss=sum(loss[n, lr] for n in small) / len(small),
        widest=widest,
        loss=loss.get((widest, lr)),
        best_lr=None if top is None else top.lr,
        best_loss=None if top is None else top.val_loss,
        settled=all((widest, v) in loss for v in lrs),
    )


@dataclass(frozen=True)
class SweepReport:
    """What a finished (or partly finished) sweep says: each width's best, whether they line up, and the
    predictive check."""

    best: list[Best]
    transfer: Transfer | None
    prediction: Prediction | None

    def to_json(self) -> dict[str, Any]:
        """ladder.json's keys for the sweep."""
        return {
            "lr_sweep_best": [b.to_json() for b in self.best],
            "lr_transfer": None if self.transfer is None else self.transfer.to_json(),
            "lr_prediction": None if self.prediction is None else self.prediction.to_json(),
        }


def sweep_report(outcomes: list[Outcome]) -> SweepReport:
    best = best_lrs(outcomes)
    grid = sorted({o.info.lr for o in outcomes})
    return SweepReport(best=best, transfer=lr_transfer(best, grid), prediction=predict(outcomes, best))


def _percent(gap: float) -> str:
    return f"{100 * gap:+.2f}%"


def report_lines(report: SweepReport) -> list[str]:
    """The transfer criterion and the predictive check, in words, below the table."""
    lines = []
    t = report.transfer
    if t is not None:
        where = ", ".join(f"{name} {lr:g}" for name, lr in t.best.items())
        lines.append(
            "  learning-rate transfer (the best lr is the same grid point or the next at every width): "
            f"{'yes' if t.holds else 'NO'}, {t.spread} grid step(s) apart ({where})"
        )
    p = report.prediction
    if p is None:
        lines.append("  predictive check: needs three widths, and the two narrowest finished at one learning rate")
        return lines
    head = (
        f"  predictive check: lr {p.lr:g} picked at {' and '.join(p.picked_at)} (their lowest mean final loss, "
        f"{p.picked_loss:.4f}); {p.widest} at it "
    )
    if p.loss is None or p.gap is None:
        lines.append(head + "has not finished")
        return lines
    verdict = {True: "PASS", False: "FAIL", None: "so far"}[p.passed]
    lines.append(
        head + f"{p.loss:.4f}, its best {p.best_loss:.4f} (lr {p.best_lr:g}): {_percent(p.gap)}, "
        f"within {100 * PREDICT_TOLERANCE:g}%: {verdict}"
    )
    return lines


def sweep_lines(outcomes: list[Outcome], report: SweepReport) -> list[str]:
    """A table of final validation loss, one row per width and one column per learning rate, the best,
    and the report's verdicts."""
    lrs = sorted({o.info.lr for o in outcomes})
    loss = {(o.info.name, o.info.lr): o.val_loss for o in outcomes if o.finished}
    lines = ["  learning-rate sweep: final validation loss (* the best at each width)"]
    lines.append(f"    {'rung':<12}" + "".join(f"{lr:>10.3g}" for lr in lrs) + "   best lr")
    winner = {b.name: b for b in report.best}
    for name in widths_in_order(outcomes):
        cells = ""
        for lr in lrs:
            v = loss.get((name, lr))
            mark = "*" if name in winner and winner[name].lr == lr else " "
            cells += f"{'-':>10}" if v is None else f"{v:>9.4f}{mark}"
        w = winner.get(name)
        lines.append(f"    {name:<12}{cells}   {'-' if w is None else f'{w.lr:g} ({w.tried} of {len(lrs)} done)'}")
    return lines + report_lines(report)


def sweep_figure(outcomes: list[Outcome], report: SweepReport, title: str) -> Figure:
    """Final validation loss against learning rate (log), one curve per width, its minimum starred; the
    predictive check's learning rate as a dotted line, and the widest width's loss at it ringed in red."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    names = widths_in_order(outcomes)
    cmap = colormaps["viridis"]
    for i, name in enumerate(names):
        points = sorted((o.info.lr, o.val_loss) for o in outcomes if o.info.name == name and o.finished)
        if not points:
            continue
        color = cmap(0.9 * i / max(1, len(names) - 1))
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "-o", color=color, lw=1.5, ms=4, label=name)
        for b in report.best:
            if b.name == name:
                ax.plot([b.lr], [b.val_loss], "*", color=color, ms=14, mec="k", mew=0.6)
    p = report.prediction
    if p is not None:
        ax.axvline(p.lr, color="tab:red", ls=":", lw=1.2, label=f"picked at {' and '.join(p.picked_at)}: {p.lr:g}")
        if p.loss is not None and p.gap is not None:
            verdict = {True: "pass", False: "FAIL", None: "so far"}[p.passed]
            label = f"{p.widest} at it: {_percent(p.gap)} of its best ({verdict})"
            ax.plot([p.lr], [p.loss], "o", mfc="none", mec="tab:red", mew=2, ms=16, label=label)
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("learning rate (optim.lr; under μP the base width's, each group times its lr_scale)")
    ax.set_ylabel("final validation loss (nats per token)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, title="width")
    return fig
