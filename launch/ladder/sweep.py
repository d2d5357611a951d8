"""`scalegpt ladder CONFIG --lr-sweep LR1,LR2,...`: learning-rate transfer, the μP paper's Figure 1 in
miniature. The sweep is an axis of the ladder over optim.lr (plan.py's parse_sweep): every rung trains at every
learning rate, as an ordinary rung (resumable, skipped once finished), and each width's rungs share one
learning rate whatever their width, so the ladder's width rule (--lr-exponent) is off. This module reads
the finished rungs: the best learning rate per width, the table that prints it, and the figure of final
loss against learning rate, one curve per width. Under μP the curves' minima should line up; under the
standard parametrization they move to smaller learning rates as the model widens.
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


def sweep_lines(outcomes: list[Outcome], best: list[Best]) -> list[str]:
    """A table of final validation loss, one row per width and one column per learning rate, and the best."""
    lrs = sorted({o.info.lr for o in outcomes})
    loss = {(o.info.name, o.info.lr): o.val_loss for o in outcomes if o.finished}
    names = list(dict.fromkeys(o.info.name for o in sorted(outcomes, key=lambda o: o.info.d_model)))
    lines = ["  learning-rate sweep: final validation loss (* the best at each width)"]
    lines.append(f"    {'rung':<12}" + "".join(f"{lr:>10.3g}" for lr in lrs) + "   best lr")
    winner = {b.name: b for b in best}
    for name in names:
        cells = ""
        for lr in lrs:
            v = loss.get((name, lr))
            mark = "*" if name in winner and winner[name].lr == lr else " "
            cells += f"{'-':>10}" if v is None else f"{v:>9.4f}{mark}"
        w = winner.get(name)
        lines.append(f"    {name:<12}{cells}   {'-' if w is None else f'{w.lr:g} ({w.tried} of {len(lrs)} done)'}")
    return lines


def sweep_figure(outcomes: list[Outcome], best: list[Best], title: str) -> Figure:
    """Final validation loss against learning rate (log), one curve per width, its minimum starred."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    shapes = sorted({(o.info.d_model, o.info.name) for o in outcomes})
    cmap = colormaps["viridis"]
    for i, (_, name) in enumerate(shapes):
        points = sorted((o.info.lr, o.val_loss) for o in outcomes if o.info.name == name and o.finished)
        if not points:
            continue
        color = cmap(0.9 * i / max(1, len(shapes) - 1))
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "-o", color=color, lw=1.5, ms=4, label=name)
        for b in best:
            if b.name == name:
                ax.plot([b.lr], [b.val_loss], "*", color=color, ms=14, mec="k", mew=0.6)
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("learning rate (optim.lr; under μP the base width's, each group times its lr_scale)")
    ax.set_ylabel("final validation loss (nats per token)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, title="width")
    return fig
