"""Running one rung: `scalegpt train` in a child process, or `scalegpt launch` with the ladder's --launch
options, after refusing a rung directory that another config made."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from ...train.config.schema import Config
from ...train.errors import UserError
from ...train.lifeline import launcher_mark
from ...train.rundir import check_same_experiment
from ..launcher import forward_stop_signals, launch_command
from ..options import Parser, add_launch_parser
from .plan import LadderPlan, Rung


# -- before a rung trains ----------------------------------------------------------------------------------
def check_rung_config(rung: Rung, ladder_dir: Path) -> None:
    """A rung directory made with another config is another experiment: refuse it before the ladder
    counts it as done or resumes it, as the trainer itself would."""
    rung_dir = ladder_dir / rung.info.dir
    check_same_experiment(
        rung_dir,
        rung.cfg,
        name=f"rung {rung_dir}",
        fix="give this ladder another run.dir, or remove that rung directory to train it again",
    )


# -- running a rung ----------------------------------------------------------------------------------------
def _run_local(config: str, overrides: list[str]) -> int:
    """`scalegpt train CONFIG overrides` in a child process, as a user would type it. SIGTERM and SIGUSR1
    go on to it, so it saves a checkpoint and stops; the ladder then stops after it."""
    argv = [sys.executable, "-m", "scalegpt", "train", config, *overrides]
    print(f"scalegpt: ladder: {shlex.join(['scalegpt', *argv[3:]])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv, env={**os.environ, **launcher_mark()})  # a killed ladder takes its rung with it
    try:
        with forward_stop_signals(proc.send_signal):
            return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too; let it exit before we do
        proc.wait()
        raise


def launch_namespace(config: str, launch_args: list[str]) -> argparse.Namespace:
    """`--launch ...` read by `scalegpt launch`'s own parser, so every launch option means what it means there."""
    parser = Parser(prog="scalegpt")
    add_launch_parser(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    ns, extra = parser.parse_known_args(["launch", config, *launch_args])
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        raise UserError(f"--launch: unrecognized arguments: {' '.join(bad)} (see `scalegpt launch --help`)")
    if extra or ns.overrides:
        raise UserError("--launch takes launch options only; put key=value overrides before --launch")
    if not (ns.procs is not None or ns.gpus is not None or ns.hostfile is not None or ns.slurm):
        raise UserError("--launch needs where to run each rung: --procs N, --gpus N, --hostfile FILE or --slurm")
    return ns


def rung_world_size(ns: argparse.Namespace | None, cfg: Config) -> int:
    """Ranks per rung, which sets the global batch when train.global_batch is 0."""
    if ns is None:
        return 1
    if ns.procs is not None or ns.gpus is not None:
        flag, ranks = ("--procs", ns.procs) if ns.procs is not None else ("--gpus", ns.gpus)
        if ranks < 1:  # found here, before the plan divides the global batch by it
            raise UserError(f"--launch {flag} must be at least 1, got {ranks}")
        return ranks
    if not cfg.train.global_batch:
        raise UserError(
            "with --hostfile or --slurm the ladder needs train.global_batch set (not 0): each rung's token "
            "budget is counted in whole steps before the jobs start"
        )
    return 1


def run_rung(plan: LadderPlan, rung: Rung, launch: argparse.Namespace | None) -> int:
    if launch is None:
        return _run_local(plan.config, rung.overrides)

    return launch_command(replace_namespace(launch, overrides=list(rung.overrides)))


def replace_namespace(ns: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(ns), **changes})


def prepare_data(plan: LadderPlan) -> None:
    """`scalegpt prepare` once per distinct data section (an --axis over data.* may change it). It does
    nothing when the prepared data are up to date, so a clean clone and a re-run take the same path."""
    done: list[Any] = []
    for rung in plan.rungs:
        if rung.cfg.data in done:
            continue
        done.append(rung.cfg.data)
        prepare_once(plan.config, [*plan.overrides, *rung.axis_override])


def prepare_once(config: str, overrides: list[str]) -> None:
    """`scalegpt prepare CONFIG overrides` in a child process, as a user would type it."""
    code = subprocess.run([sys.executable, "-m", "scalegpt", "prepare", config, *overrides]).returncode
    if code != 0:
        raise UserError(f"`scalegpt prepare {config}` failed (exit code {code}); see its message above")
