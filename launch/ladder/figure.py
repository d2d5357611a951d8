"""The ladder's figure in the style of GPT-3's Figure 3.1: validation loss against training compute on
log-log axes, one learning curve per rung, and the fitted power-law frontier; beside it, final loss
against parameters with L(N). An --isoflop ladder draws Chinchilla's Figure 3 instead (isoflop_figure).
matplotlib's object API on the Agg canvas, as launch/plot.py uses.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from .isoflop import IsoflopFit
from .results import GroupFit, Outcome, PowerLaw


def _colors(outcomes: list[Outcome], fits: list[GroupFit]) -> tuple[dict[str, tuple], dict[str | None, tuple]]:
    """One colour per rung (by size, as the paper's colour bar runs by parameters) when there is one
    frontier; one colour per axis value, shaded by size, when there are several."""
    groups = [g.axis_value for g in fits]
    sizes = sorted({o.info.params for o in outcomes})
    shade = {p: i / max(1, len(sizes) - 1) for i, p in enumerate(sizes)}
    if len(groups) <= 1:
        cmap = colormaps["viridis"]
        rung = {o.info.label: cmap(0.9 * shade[o.info.params]) for o in outcomes}
        return rung, {groups[0] if groups else None: (0.1, 0.1, 0.1, 1.0)}
    maps = ["Blues", "Oranges", "Greens", "Reds", "Purples", "Greys"]
    group = {g: colormaps[maps[i % len(maps)]](0.85) for i, g in enumerate(groups)}
    rung = {
        o.info.label: colormaps[maps[groups.index(o.info.axis_value) % len(maps)]](0.35 + 0.6 * shade[o.info.params])
        for o in outcomes
    }
    return rung, group


def _frontier(ax: Axes, fits: list[PowerLaw], x_min: float, x_max: float, color: tuple, prefix: str, var: str) -> None:
    """The plain power law solid, the offset form dashed, over a little more than the points' range."""
    xs = np.geomspace(x_min / 2, x_max * 2, 100)
    for fit, style in zip(fits, ("-", "--"), strict=False):
        if fit.form == "power+offset" and fit.c <= 0:
            continue  # the floor went to its bound: the same curve as the plain fit
        ax.plot(xs, fit(xs), style, color=color, lw=1.6, alpha=0.9, label=f"{prefix}{fit.formula(var)}")


def _log_axes(ax: Axes) -> None:
    """Log-log, with losses written as plain numbers: a loss axis spans less than a decade."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.grid(alpha=0.3, which="both")


def _compute_panel(ax: Axes, outcomes: list[Outcome], fits: list[GroupFit], colors: tuple) -> None:
    rung_color, group_color = colors
    for o in outcomes:
        points = [(t * o.info.flops_per_token, loss) for t, loss in o.curve if t > 0]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "-", color=rung_color[o.info.label], lw=1.2, alpha=0.8)
        if o.finished:
            ax.plot([o.info.flops], [o.val_loss], "o", color=rung_color[o.info.label], ms=5, label=o.info.label)
    for g in fits:
        done = [o for o in outcomes if o.finished and o.info.axis_value == g.axis_value]
        if g.loss_vs_compute and done:
            flops = [o.info.flops for o in done]
            prefix = "" if g.axis_value is None else f"{g.axis_value}: "
            _frontier(ax, g.loss_vs_compute, min(flops), max(flops), group_color[g.axis_value], prefix, "C")
    _log_axes(ax)
    ax.set_xlabel("training compute C (FLOPs: tokens x model/flops.py's FLOPs per token)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("learning curves and the compute frontier")
    ax.legend(fontsize=7, loc="upper right")


def _params_panel(ax: Axes, outcomes: list[Outcome], fits: list[GroupFit], colors: tuple) -> None:
    rung_color, group_color = colors
    for o in outcomes:
        if o.finished:
            ax.plot([o.info.params], [o.val_loss], "o", color=rung_color[o.info.label], ms=6)
    for g in fits:
        done = [o for o in outcomes if o.finished and o.info.axis_value == g.axis_value]
        if g.loss_vs_params and done:
            params = [o.info.params for o in done]
            prefix = "" if g.axis_value is None else f"{g.axis_value}: "
            _frontier(ax, g.loss_vs_params, min(params), max(params), group_color[g.axis_value], prefix, "N")
    _log_axes(ax)
    ax.set_xlabel("parameters N (all but the position embedding)")
    ax.set_ylabel("final validation loss (nats per token)")
    ax.set_title("final loss against size")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")


def ladder_figure(outcomes: list[Outcome], fits: list[GroupFit], *, title: str, caveat: str) -> Figure:
    """The two panels, the title, and the caveat under them in plain words."""
    fig = Figure(figsize=(14, 6.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.5, 1])
    colors = _colors(outcomes, fits)
    _compute_panel(left, outcomes, fits, colors)
    _params_panel(right, outcomes, fits, colors)
    fig.suptitle(title)
    fig.supxlabel(textwrap.fill(caveat, 170), fontsize=8, color="0.3")
    return fig


# -- --isoflop -----------------------------------------------------------------------------------------------
def _isoflop_curves(ax: Axes, fit: IsoflopFit, colors: list[tuple]) -> None:
    for curve, color in zip(fit.curves, colors, strict=True):
        if not curve.params:
            continue
        ax.plot(curve.params, curve.losses, "o", color=color, ms=6, label=f"C = {curve.budget:.3g}")
        if curve.coef is None:
            continue
        xs = np.geomspace(min(curve.params) / 1.4, max(curve.params) * 1.4, 100)
        ax.plot(xs, np.polyval(curve.coef, np.log(xs)), "-", color=color, lw=1.4, alpha=0.85)
        if curve.n_opt is not None:
            face = color if curve.inside else "none"
            ax.plot([curve.n_opt], [curve.loss_opt], "*", color=color, mfc=face, mec="k", mew=0.6, ms=15)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis run into each other
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("parameters N (all but the position embedding)")
    ax.set_ylabel("final validation loss (nats per token)")
    ax.set_title("IsoFLOP curves: a parabola in log N per budget, ★ its minimum")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, title="budget (FLOPs)")


def _isoflop_scaling(ax: Axes, fit: IsoflopFit, colors: list[tuple], which: str) -> None:
    """N_opt (which="n") or D_opt ("d") against C, each budget's point in its colour (hollow when its
    minimum is outside the sizes and so left out of the fit), and the fitted line."""
    law = fit.n_opt if which == "n" else fit.d_opt
    for curve, color in zip(fit.curves, colors, strict=True):
        y = curve.n_opt if which == "n" else curve.d_opt
        if y is not None:
            ax.plot([curve.budget], [y], "o", color=color, mfc=color if curve.inside else "none", mec=color, ms=8)
    if law is not None:
        cs = np.geomspace(min(fit.used) / 2, max(fit.used) * 2, 50)
        name, exp = ("N_opt", "a") if which == "n" else ("D_opt", "b")
        ax.plot(cs, law(cs), "-", color="0.15", lw=1.4, label=law.formula(name, exp))
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("compute budget C (FLOPs)")
    ax.set_ylabel("parameters N_opt" if which == "n" else "tokens D_opt = C / FLOPs per token(N_opt)")
    ax.set_title("best size against compute" if which == "n" else "best token count against compute")


def isoflop_figure(fit: IsoflopFit, *, title: str, caveat: str) -> Figure:
    """Chinchilla's Figure 3 in miniature: the IsoFLOP curves, then N_opt and D_opt against C."""
    fig = Figure(figsize=(17, 5.6), layout="constrained")
    left, middle, right = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    cmap = colormaps["plasma"]
    colors = [cmap(0.8 * i / max(1, len(fit.curves) - 1)) for i in range(len(fit.curves))]
    _isoflop_curves(left, fit, colors)
    _isoflop_scaling(middle, fit, colors, "n")
    _isoflop_scaling(right, fit, colors, "d")
    fig.suptitle(title)
    fig.supxlabel(textwrap.fill(caveat, 200), fontsize=8, color="0.3")
    return fig
