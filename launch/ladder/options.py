"""`scalegpt ladder`'s arguments. launch/cli.py builds every command's parser on each start, so this
module imports argparse only."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import __doc__ as LADDER_DOC

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_LR_EXPONENT = 1.0
"""lr = optim.lr x (d_ref / d_model)^1: narrower rungs take larger steps. Table 2.1's learning rates fall
about as fast with width (6e-4 at d_model 768 to 0.6e-4 at 12288, d_model^-0.83), and on the CPU ladder
this beat exponents 0 and 0.5 at every size tried (bench/RESULTS.md)."""
DEFAULT_RUNGS = 5
"""Rungs below the config's d_model by factors of sqrt(2), when --sizes is not given."""


def add_parser(sub: _Subparsers) -> argparse.ArgumentParser:
    """Register `scalegpt ladder` on the command line's sub-parsers."""
    s = sub.add_parser(
        "ladder",
        help="a scaling-law ladder: train several model sizes, fit loss against compute (GPT-3 Figure 3.1)",
        description=(LADDER_DOC or "").split("\n\n")[0],
    )
    s.add_argument("config", help="run YAML; its model is the top rung, e.g. configs/ladder-cpu.yaml")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. run.dir=runs/my-ladder")
    s.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="SIZE",
        help="d_model of each rung (the size rule picks layers and heads) or LAYERSxD_MODEL; default: "
        f"{DEFAULT_RUNGS} widths from the config's d_model down by factors of sqrt(2) (with --isoflop: five "
        "sizes per budget around N = sqrt(C / 120), parameters spaced by sqrt(2))",
    )
    budget = s.add_mutually_exclusive_group()
    budget.add_argument(
        "--tokens", type=float, default=None, metavar="T", help="train every rung on T tokens (as GPT-3 did)"
    )
    budget.add_argument(
        "--flops", type=float, default=None, metavar="C", help="train every rung for C FLOPs (an isoFLOP ladder)"
    )
    budget.add_argument(
        "--isoflop",
        default=None,
        metavar="C1,C2,...",
        help="IsoFLOP sizing (Chinchilla's Approach 2): at each FLOP budget train several sizes, each on budget / "
        "FLOPs per token, fit a parabola of loss against log N per budget and N_opt, D_opt against C "
        "(ladder.json, ladder.png; then `scalegpt plan CONFIG --compute C --from LADDER`)",
    )
    budget.add_argument(
        "--tokens-per-param",
        type=float,
        default=None,
        metavar="K",
        help="train each rung on K x its parameters (default: the config's tokens over its model's parameters)",
    )
    s.add_argument(
        "--lr-exponent",
        type=float,
        default=DEFAULT_LR_EXPONENT,
        metavar="P",
        help="lr = optim.lr x (config d_model / rung d_model)^P (default %(default)s)",
    )
    s.add_argument("--aspect", type=float, default=None, metavar="A", help="size rule: d_model per layer (default 64)")
    s.add_argument(
        "--d-head", type=int, default=None, metavar="H", help="size rule: head width (default: the config's)"
    )
    s.add_argument(
        "--evals", type=int, default=12, metavar="N", help="validation points per learning curve (default 12)"
    )
    s.add_argument(
        "--checkpoints", type=int, default=4, metavar="N", help="checkpoints per rung, for resuming (default 4)"
    )
    s.add_argument("--axis", default=None, metavar="KEY=V1,V2", help="run the ladder once per value of a config key")
    s.add_argument(
        "--lr-sweep",
        default=None,
        metavar="LR1,LR2,...",
        help="train every rung at each of these learning rates (the same at every width) and report the best "
        "per width (ladder.json, lr_sweep.png)",
    )
    s.add_argument(
        "--coord-check",
        action="store_true",
        help="instead of a ladder: the μP coordinate check, a few steps at each of --widths under both "
        "parametrizations, recording each layer's activation size (coord.json, coord.png)",
    )
    s.add_argument(
        "--widths",
        default="64,128,256,512,1024",
        metavar="W1,W2,...",
        help="--coord-check: the widths (d_model) to train; the smallest is μP's base (default %(default)s)",
    )
    s.add_argument(
        "--coord-steps",
        type=int,
        default=4,
        metavar="N",
        help="--coord-check: optimizer steps per width (default %(default)s)",
    )
    s.add_argument(
        "--launch",
        nargs=argparse.REMAINDER,
        default=None,
        help="last: run each rung through `scalegpt launch` with these options (--procs N, --gpus N, "
        "--hostfile F or --slurm, and the rest of launch's options)",
    )
    return s
