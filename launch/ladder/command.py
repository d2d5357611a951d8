"""`scalegpt ladder` (its arguments: options.py), and `scalegpt plot` of a ladder directory: train what
is pending, read every rung's state, fit, and write ladder.json and the figure."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ...train.config.loading import load_config
from ...train.errors import UserError
from ...train.osutil import write_json_atomic
from .. import plot
from .coord import coord_command
from .figure import isoflop_figure, ladder_figure
from .fit import fit_all
from .isoflop import CAVEAT as ISOFLOP_CAVEAT
from .isoflop import fit_isoflop, isoflop_lines
from .plan import LadderPlan, Rung, describe_plan, plan_ladder, plan_summary
from .results import CAVEAT, LADDER_JSON, LADDER_PNG, GroupFit, Outcome, RungInfo, outcome
from .run import check_rung_config, launch_namespace, prepare_data, run_rung, rung_world_size
from .sweep import SWEEP_PNG, sweep_figure, sweep_lines, sweep_report


def summary_lines(outcomes: list[Outcome], fits: list[GroupFit]) -> list[str]:
    lines = []
    for o in outcomes:
        if o.finished:
            lines.append(
                f"  {o.info.label:<28} {o.info.params:>10,} params {o.info.flops:>9.3g} FLOPs  "
                f"val loss {o.val_loss:.4f}  {o.val_bpb or float('nan'):.4f} bits/byte"
            )
        else:
            lines.append(f"  {o.info.label:<28} {o.status} (step {o.step} of {o.info.steps})")
    for g in fits:
        head = f"  fit{'' if g.axis_value is None else ' ' + g.axis_value} ({g.points} rungs):"
        if not g.loss_vs_compute:
            lines.append(f"{head} {g.note}")
            continue
        lines.append(head)
        lines += [f"    loss vs compute   {f.formula('C')}" for f in g.loss_vs_compute]
        lines += [f"    loss vs params    {f.formula('N')}" for f in g.loss_vs_params]
        lines += [f"    bits/byte vs C    {f.formula('C').replace('L =', 'bpb =')}" for f in g.bpb_vs_compute]
        lines.append(f"    loss falls monotonically with size: {'yes' if g.loss_falls_with_size else 'NO'}")
    return lines


def read_summary(ladder_dir: Path) -> dict[str, Any]:
    """ladder.json, or a UserError that says what the directory is missing."""
    path = ladder_dir / LADDER_JSON
    if not path.is_file():
        raise UserError(f"{ladder_dir} has no {LADDER_JSON}; run `scalegpt ladder CONFIG` to make a ladder there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        [RungInfo.from_json(r) for r in data["rungs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a ladder summary scalegpt wrote ({exc}); run the ladder again") from exc
    return data


def refresh(
    ladder_dir: Path, summary: dict[str, Any], *, png: Path | None = None, write: bool = True
) -> tuple[list[str], Path | None]:
    """Read every rung's state, fit the finished ones, rewrite ladder.json and draw the figure (when at
    least one rung has finished). Returns the lines to print and the PNG written, if any."""
    infos = [RungInfo.from_json(r) for r in summary["rungs"]]
    outcomes = [outcome(ladder_dir, info) for info in infos]
    budgets = summary.get("isoflop")
    iso = fit_isoflop(budgets, outcomes) if budgets else None
    fits = [] if iso else fit_all(outcomes)  # at one budget, loss against compute is no frontier
    summary = {
        **summary,
        "rungs": [
            {**vars(o.info), "status": o.status, "step": o.step, "val_loss": o.val_loss, "val_bpb": o.val_bpb}
            for o in outcomes
        ],
        "fits": [g.to_json() for g in fits],
        "caveat": ISOFLOP_CAVEAT if iso else CAVEAT,
    }
    sweep = sweep_report(outcomes) if summary.get("lr_sweep") else None
    if sweep is not None:
        summary.update(sweep.to_json())
    if iso is not None:
        summary["isoflop_fit"] = iso.to_json()
    if write:
        write_json_atomic(ladder_dir / LADDER_JSON, summary)
    lines = summary_lines(outcomes, fits) + ([] if sweep is None else sweep_lines(outcomes, sweep))
    lines += [] if iso is None else isoflop_lines(iso)
    if not any(o.finished for o in outcomes):
        return lines, None
    out = png or ladder_dir / LADDER_PNG
    title = _title(ladder_dir, summary)
    figure = (
        isoflop_figure(iso, title=title, caveat=ISOFLOP_CAVEAT)
        if iso
        else ladder_figure(outcomes, fits, title=title, caveat=CAVEAT)
    )
    plot.save_png(figure, out)
    if sweep is not None:
        plot.save_png(sweep_figure(outcomes, sweep, title), out.with_name(SWEEP_PNG))
    return lines, out


def _title(ladder_dir: Path, summary: dict[str, Any]) -> str:
    return f"{ladder_dir.name}: {summary.get('budget_text', '')}, data {summary.get('data', '?')}"


def _say(line: str) -> None:
    print(line, flush=True)


def _train_pending(plan: LadderPlan, launch: argparse.Namespace | None, summary: dict[str, Any]) -> list[Rung]:
    """Train (or submit) every rung that is not done, smallest first; returns the rungs left pending.
    A rung that stops short (a stop signal, an error) stops the ladder: the next run resumes it."""
    slurm = launch is not None and launch.slurm
    pending: list[Rung] = []
    for i, rung in enumerate(plan.rungs, 1):
        state = outcome(plan.ladder_dir, rung.info)
        where = f"rung {i}/{len(plan.rungs)} {rung.info.label}"
        if state.status == "done":
            _say(f"{where}: finished earlier, not trained again")
            continue
        if slurm and state.status == "submitted":
            _say(f"{where}: submitted earlier (step {state.step} of {rung.info.steps} so far)")
            pending.append(rung)
            continue
        resume = f", resuming from step {state.step}" if state.step else ""
        _say(f"{where}: {'submitting' if slurm else 'training'} {rung.info.steps} steps{resume}")
        start = time.monotonic()
        code = run_rung(plan, rung, launch)
        if slurm:
            pending.append(rung)
            continue
        after = outcome(plan.ladder_dir, rung.info)
        if after.status != "done":
            refresh(plan.ladder_dir, summary)
            run_dir = plan.ladder_dir / rung.info.dir
            if code == 0:  # the trainer saved and stopped on a signal
                _say(f"{where}: stopped at step {after.step}; run the same command again to resume it")
                return [r for r in plan.rungs if not outcome(plan.ladder_dir, r.info).finished]
            raise UserError(
                f"{where} ({run_dir}) exited with code {code} at step {after.step} of {rung.info.steps}; see its "
                "message above. Running the same command again keeps the finished rungs and resumes this one"
            )
        _say(f"{where}: done in {time.monotonic() - start:.0f} s, validation loss {after.val_loss:.4f}")
    return pending


def ladder_command(args: argparse.Namespace) -> int:
    """Entry point of `scalegpt ladder` (its parser: options.py)."""
    if args.coord_check:
        return coord_command(args)
    started = time.monotonic()
    if args.sizes:  # `--sizes 64 128 run.dir=x`: argparse gives the override to --sizes; it is an override
        args.overrides = [*args.overrides, *(s for s in args.sizes if "=" in s)]
        args.sizes = [s for s in args.sizes if "=" not in s]
    launch = launch_namespace(args.config, args.launch) if args.launch is not None else None
    world = rung_world_size(launch, load_config(args.config, args.overrides))
    plan = plan_ladder(args, world)
    for line in describe_plan(plan):
        _say(line)
    if launch is not None and launch.dry_run:
        for rung in plan.rungs:
            run_rung(plan, rung, launch)
        return 0
    for rung in plan.rungs:
        check_rung_config(rung, plan.ladder_dir)
    summary = plan_summary(plan)
    plan.ladder_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan.ladder_dir / LADDER_JSON, summary)
    if not all(outcome(plan.ladder_dir, r.info).finished for r in plan.rungs):
        prepare_data(plan)
    pending = _train_pending(plan, launch, summary)
    lines, png = refresh(plan.ladder_dir, summary)
    _say(f"ladder {plan.ladder_dir} after {time.monotonic() - started:.0f} s:")
    for line in lines:
        _say(line)
    if pending:
        _say(f"{len(pending)} rung(s) pending: {', '.join(r.info.label for r in pending)}")
        if launch is not None and launch.slurm:
            _say("run the same command again once they finish: it fits the finished rungs and lists the rest")
        else:
            _say("run the same command again to train them: a stopped rung resumes from its checkpoint")
    sweep_png = f" and {png.with_name(SWEEP_PNG)}" if png and plan.sweep else ""
    _say(f"wrote {plan.ladder_dir / LADDER_JSON}" + (f" and {png}" if png else "") + sweep_png)
    _say(f"note: {ISOFLOP_CAVEAT if plan.isoflop else CAVEAT}")
    return 0


def plot_command(args: argparse.Namespace) -> int:
    """`scalegpt plot`: a ladder directory draws the ladder's figure; any other directory is a run, drawn by
    launch/plot.py. The choice is made here, above both, so that plot.py never imports the ladder."""
    out = plot.output_path(args)
    ladder = plot_ladder_dir(Path(args.run_dir), out if args.out else None)
    return ladder if ladder is not None else plot.plot_command(args)


def plot_ladder_dir(path: Path, out: Path | None) -> int | None:
    """`scalegpt plot` on a ladder directory: the ladder's figure, or None when `path` is not one."""
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(
            f"{path} is empty: it has no metrics.jsonl (pass a run directory that has trained) and no {LADDER_JSON} "
            "(for a ladder directory, run `scalegpt ladder CONFIG` there first)"
        )
    if not (path / LADDER_JSON).is_file():
        return None
    summary = read_summary(path)
    lines, png = refresh(path, summary, png=out, write=False)
    if png is None:
        raise UserError(
            f"ladder {path} has no finished rung yet ({len(summary['rungs'])} planned); run "
            f"`scalegpt ladder {summary.get('config', 'CONFIG')}` to train them, then plot"
        )
    for line in lines:
        _say(line)
    _say(f"wrote {png}" + (f" and {png.with_name(SWEEP_PNG)}" if summary.get("lr_sweep") else ""))
    return 0
