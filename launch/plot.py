"""`scalegpt plot RUN_DIR`: a run's curves as one PNG, read from RUN_DIR/metrics.jsonl.

Panels: training and validation loss, validation bits per byte, learning rate, throughput, gradient
norm, and epochs elapsed per source (GPT-3 Table 2.2's last column, over time). The epochs come from
the prepared data's manifest and the run's own weights (config.yaml) through Mixture.consumed, the same
arithmetic the sampler uses; without the prepared data that panel says why it is empty. matplotlib's
object API with the Agg canvas is used, so no display and no global backend state are involved.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..train.config.schema import read_config_file
from ..train.data.mixture import Mixture
from ..train.data.tokenizer import load_tokenizer, tokenizer_hash
from ..train.errors import UserError, check_writable_dir
from ..train.osutil import atomic_path
from ..train.rundir import CONFIG, CURVES, METRICS, TOKENIZER, read_metrics

PANELS = (
    "loss",
    "bits per byte (validation)",
    "learning rate",
    "throughput (tokens/s)",
    "gradient norm",
    "epochs elapsed per source",
)
"""Axes titles, in the figure's reading order."""

_MAX_EPOCH_POINTS = 200


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average: the trend through a noisy training loss."""
    alpha, out, avg = 2.0 / (span + 1), [], values[0] if values else 0.0
    for v in values:
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def _sources(records: list[dict[str, Any]], prefix: str) -> list[str]:
    names: list[str] = []
    for r in records:
        for k in r:
            if k.startswith(prefix) and k[len(prefix) :] not in names:
                names.append(k[len(prefix) :])
    return names


def _note(ax: Axes, text: str) -> None:
    """Say in the panel why it is empty."""
    ax.text(0.5, 0.5, textwrap.fill(text, 48), ha="center", va="center", fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("")


def epochs_by_source(
    run_dir: Path, records: list[dict[str, Any]], data_dir: str | Path | None = None
) -> tuple[dict[str, tuple[list[int], list[float]]] | None, str]:
    """Per source, (steps, epochs elapsed) from the prepared data; or None and why not."""
    config_file = run_dir / CONFIG
    if not config_file.is_file():
        return None, f"no {CONFIG} in {run_dir}"
    cfg = read_config_file(config_file)
    where = Path(data_dir if data_dir is not None else cfg.data.dir)
    try:
        expect = tokenizer_hash(load_tokenizer(run_dir / TOKENIZER))
        mixture = Mixture.for_config(cfg, data_dir=where, tokenizer_hash=expect)  # the run's weights and stages
    except UserError as exc:
        return None, f"epochs need the run's prepared data: {exc}"
    stride = max(1, len(records) // _MAX_EPOCH_POINTS)
    picked = records[::stride] if records[-1] in records[::stride] else [*records[::stride], records[-1]]
    out: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in mixture.names}
    for r in picked:
        tokens = r.get("tokens")
        if not isinstance(tokens, int):
            continue
        for name, used in mixture.consumed(tokens // mixture.n_ctx).items():
            out[name][0].append(int(r["step"]))
            out[name][1].append(used["epochs"])
    return out, f"epochs from {where}"


def _loss_panel(ax: Axes, records: list[dict[str, Any]], color: dict[str, str]) -> None:
    steps, loss = _series(records, "loss")
    if steps:
        ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8)
        ax.plot(steps, _ema(loss, max(3, len(loss) // 30)), color="C0", label="train (EMA)")
    xs, ys = _series(records, "val_loss")
    if xs:
        ax.plot(xs, ys, "o-", color="C3", ms=3, label="validation")
    for name in color:
        ax.plot(*_series(records, f"val_loss/{name}"), "--", color=color[name], lw=1, label=f"val {name}")
    ax.set_ylabel("nats per token")
    ax.legend(fontsize=8)


def _bpb_panel(ax: Axes, records: list[dict[str, Any]], color: dict[str, str]) -> None:
    xs, ys = _series(records, "val_bpb")
    if not xs:
        _note(ax, "no validation yet (eval.every = 0, or before the first evaluation)")
        return
    ax.plot(xs, ys, "o-", color="C3", ms=3, label="mixture")
    for name in _sources(records, "val_bpb/"):
        ax.plot(*_series(records, f"val_bpb/{name}"), "--", color=color.get(name), lw=1, label=name)
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=8)


def _line_panel(ax: Axes, records: list[dict[str, Any]], key: str, label: str) -> None:
    ax.plot(*_series(records, key), color="C1")
    ax.set_ylabel(label)


def _grad_norm_panel(ax: Axes, records: list[dict[str, Any]]) -> None:
    xs, ys = _series(records, "grad_norm")
    if not xs:
        _note(ax, "no gradient norms logged")
        return
    ax.plot(xs, ys, color="C2", lw=0.8)
    ax.set_yscale("log")


def _epochs_panel(ax: Axes, epochs: dict[str, tuple[list[int], list[float]]], color: dict[str, str]) -> None:
    for name, (xs, ys) in epochs.items():
        ax.plot(xs, ys, color=color.get(name), label=name)
    ax.set_ylabel("epochs")
    ax.legend(fontsize=8)


def _blank_figure(title: str) -> tuple[Figure, list[Axes]]:
    """A 2 x 3 grid of empty panels, titled as PANELS, steps along every x axis."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = list(fig.subplots(2, 3).ravel())
    for ax, panel in zip(axes, PANELS, strict=True):
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
    fig.suptitle(title)
    return fig, axes


def plot_run(run_dir: str | Path, *, data_dir: str | Path | None = None) -> tuple[Figure, list[str]]:
    """The figure of a run's curves (axes titled as PANELS) and notes on what could not be drawn."""
    run = Path(run_dir)
    records, bad = read_metrics(run)
    notes = [f"skipped {bad} unreadable line(s) of {METRICS}"] if bad else []
    last = records[-1]
    fig, axes = _blank_figure(f"{run.name}: step {last['step']:,}, {last.get('tokens', 0):,} tokens")
    names = _sources(records, "val_loss/")
    color = {name: f"C{4 + i}" for i, name in enumerate(names)}  # one colour per source in every panel
    _loss_panel(axes[0], records, color)
    _bpb_panel(axes[1], records, color)
    _line_panel(axes[2], records, "lr", "learning rate")
    _line_panel(axes[3], records, "tokens_per_sec", "tokens / s")
    _grad_norm_panel(axes[4], records)
    epochs, why = epochs_by_source(run, records, data_dir)
    if epochs is None:
        _note(axes[5], why)
        notes.append(f"epochs panel left empty: {why}")
    else:
        _epochs_panel(axes[5], epochs, color)
    return fig, notes


def save_png(fig: Figure, out: Path) -> None:
    """Write the PNG beside its destination, then rename over it: never a half-written image."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def output_path(args: argparse.Namespace) -> Path:
    """--out, else RUN_DIR/curves.png, checked before any work."""
    out = Path(args.out) if args.out else Path(args.run_dir) / CURVES
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .png file name")
    check_writable_dir(out.parent, f"--out {out}: folder")
    return out


def plot_command(args: argparse.Namespace) -> int:
    """`scalegpt plot` of a run directory (parser in launch/cli.py; a ladder directory goes to
    launch/ladder/command.py, which calls this for anything else)."""
    run, out = Path(args.run_dir), output_path(args)
    fig, notes = plot_run(run, data_dir=getattr(args, "data_dir", None))
    for note in notes:
        print(f"scalegpt: note: {note}", file=sys.stderr)
    save_png(fig, out)
    print(f"wrote {out}")
    return 0
