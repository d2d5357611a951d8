"""`scalegpt plan CONFIG --compute C --from LADDER [--write PATH]`: the run an IsoFLOP ladder's fits choose for
a budget of C FLOPs. It reads LADDER/ladder.json (isoflop.py's fits; nothing is trained or refitted) and
gives the best size N_opt = k·C^a and tokens D_opt = k'·C^b, the loss L_opt(C) the fits predict, the size
rule's shape nearest N_opt, the tokens that shape trains on for C FLOPs, and its learning rate:

- an LR sweep in LADDER/lr-sweep/ (`scalegpt ladder CONFIG run.dir=LADDER/lr-sweep --lr-sweep ...`): its best
  learning rate at the widest width swept, as it is under mup (μP transfers it), and scaled by the ladder's
  width rule (swept width / d_model)^P under standard;
- else, under mup, the config's optim.lr; under standard, the ladder's rule optim.lr x (config d_model /
  d_model)^P, P the ladder's --lr-exponent.

`--write PATH` writes that run's resolved config as YAML (the ladder's rung recipe: the config's schedule
shape over the run's tokens), which `scalegpt train PATH` runs as it is.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...train.config.loading import load_config
from ...train.config.schema import Config, to_yaml
from ...train.errors import UserError
from ...train.osutil import atomic_write
from .isoflop import Scaling
from .plan import RungInfo, Shape, SizeRule, budget_label, budget_run, shape_params, width_lr
from .results import LADDER_JSON

SWEEP_DIR = "lr-sweep"
"""Where plan --compute looks for an LR sweep's ladder.json, under the IsoFLOP ladder's directory."""


@dataclass(frozen=True)
class ComputePlan:
    """What `plan --compute` prints and writes."""

    budget: float
    n_opt: float
    d_opt: float
    loss: float
    fitted: tuple[float, float]
    """The smallest and largest budget the fits rest on."""
    shape: Shape
    run: RungInfo
    """The shape's run at this budget: its parameters, FLOPs per token, steps, tokens and learning rate."""
    lr_source: str
    cfg: Config
    source: IsoflopSource


def _no_fit(ladder_dir: Path, why: str) -> UserError:
    return UserError(
        f"{ladder_dir} {why}; run `scalegpt ladder CONFIG --isoflop C1,C2,C3` (run.dir={ladder_dir}) first, "
        "then plan from its fits"
    )


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class IsoflopSource:
    """What plan --compute takes from an IsoFLOP ladder's ladder.json."""

    summary: dict[str, Any]
    rule: SizeRule
    lr_exponent: float
    n_opt: Scaling
    d_opt: Scaling
    loss: Scaling


def read_isoflop(ladder_dir: Path) -> IsoflopSource:
    """LADDER/ladder.json's size rule, width rule and three fits across budgets, or one UserError saying to
    run the ladder."""
    if not ladder_dir.is_dir():
        raise _no_fit(ladder_dir, "is not a directory")
    summary = _read(ladder_dir / LADDER_JSON)
    if summary is None:
        raise _no_fit(ladder_dir, f"has no readable {LADDER_JSON}")
    fit = summary.get("isoflop_fit")
    if not summary.get("isoflop"):
        raise _no_fit(ladder_dir, "holds no IsoFLOP ladder (its ladder.json has no isoflop fit)")
    if not isinstance(fit, dict):
        raise _no_fit(ladder_dir, "has no IsoFLOP fit yet (no rung has finished)")
    if not all(isinstance(fit.get(k), dict) for k in ("n_opt", "d_opt", "loss")):
        raise _no_fit(ladder_dir, f"has no IsoFLOP fit yet ({fit.get('note') or 'too few finished budgets'})")
    try:
        return IsoflopSource(
            summary=summary,
            rule=SizeRule(aspect=float(summary["size_rule"]["aspect"]), d_head=int(summary["size_rule"]["d_head"])),
            lr_exponent=float(summary["lr"]["exponent"]),
            n_opt=Scaling.from_json(fit["n_opt"]),
            d_opt=Scaling.from_json(fit["d_opt"]),
            loss=Scaling.from_json(fit["loss"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _no_fit(ladder_dir, f"has a ladder.json scalegpt did not write ({exc})") from None


def nearest_shape(cfg: Config, rule: SizeRule, n: float) -> Shape:
    """The size rule's shape (d_model a multiple of d_head) whose parameters are nearest `n` in log."""
    best: tuple[float, Shape] | None = None
    d = rule.d_head
    while True:
        shape = rule.shape(str(d))
        gap = math.log(shape_params(cfg.model, shape) / n)
        if best is None or abs(gap) < best[0]:
            best = (abs(gap), shape)
        if gap > 0:  # parameters grow with d_model: past n, the next is farther still
            return best[1]
        d += rule.d_head


def _sweep_lr(ladder_dir: Path, cfg: Config, d_model: int, exponent: float) -> tuple[float, str] | None:
    """The learning rate of an LR sweep in LADDER/lr-sweep/, transferred to d_model; None without one."""
    sweep = _read(ladder_dir / SWEEP_DIR / LADDER_JSON)
    best = (sweep or {}).get("lr_sweep_best") or []
    if not best:
        return None
    widest = max(best, key=lambda b: b["d_model"])
    where = f"{ladder_dir / SWEEP_DIR}'s best at d_model {widest['d_model']}, {widest['lr']:g}"
    if cfg.model.parametrization == "mup":
        return float(widest["lr"]), f"{where}, as μP transfers it"
    lr = float(widest["lr"]) * (widest["d_model"] / d_model) ** exponent
    return lr, f"{where}, x ({widest['d_model']} / {d_model})^{exponent:g} (the ladder's width rule)"


def plan_compute(
    config: str, overrides: list[str], budget: float, ladder_dir: Path, world_size: int = 1
) -> ComputePlan:
    """The run the IsoFLOP fits of `ladder_dir` choose for `budget` FLOPs."""
    if not (math.isfinite(budget) and budget > 0):
        raise UserError(f"--compute must be a positive number of FLOPs, got {budget:g}")
    source = read_isoflop(ladder_dir)
    cfg = load_config(config, overrides)
    exponent = source.lr_exponent
    n_opt = float(source.n_opt(budget))
    shape = nearest_shape(cfg, source.rule, n_opt)
    swept = _sweep_lr(ladder_dir, cfg, shape.d_model, exponent)
    if swept is not None:
        lr, why = swept
    elif cfg.model.parametrization == "mup":
        lr, why = cfg.optim.lr, "the config's optim.lr, as μP transfers it"
    else:
        lr = width_lr(cfg, shape.d_model, exponent)
        why = f"the ladder's rule, {cfg.optim.lr:g} x ({cfg.model.d_model} / {shape.d_model})^{exponent:g}"
    given = any(o.startswith("run.dir=") for o in overrides)
    run_dir = Path(cfg.run.dir) if given else ladder_dir / f"run-{budget_label(budget)}-{shape.name}"
    run_cfg, run = budget_run(config, overrides, shape, budget, lr, run_dir, world_size)
    used = [float(c) for c in source.summary["isoflop_fit"].get("used") or source.summary["isoflop"]]
    return ComputePlan(
        budget=budget,
        n_opt=n_opt,
        d_opt=float(source.d_opt(budget)),
        loss=float(source.loss(budget)),
        source=source,
        fitted=(min(used), max(used)),
        shape=shape,
        run=run,
        lr_source=why,
        cfg=run_cfg,
    )


def compute_lines(plan: ComputePlan, ladder_dir: Path) -> list[str]:
    lo, hi = plan.fitted
    reach = ""
    if plan.budget > hi:
        reach = f"; C is {plan.budget / hi:.3g}x the largest: an extrapolation of the fits"
    elif plan.budget < lo:
        reach = f"; C is below the smallest ({lo:.3g}): an extrapolation of the fits"
    n_law, d_law, loss_law = plan.source.n_opt, plan.source.d_opt, plan.source.loss
    r, s = plan.run, plan.shape
    return [
        f"compute plan for C = {plan.budget:.6g} FLOPs from {ladder_dir} (IsoFLOP fits over budgets {lo:.3g} to "
        f"{hi:.3g}{reach})",
        f"  N_opt      {plan.n_opt:.6g} parameters  ({n_law.formula('N_opt', 'a')})",
        f"  D_opt      {plan.d_opt:.6g} tokens  ({d_law.formula('D_opt', 'b')})",
        f"  loss       {plan.loss:.6g} predicted  ({loss_law.formula('L_opt', 'e')})",
        f"  shape      {s.name}: {s.n_layer} layers, d_model {s.d_model}, {s.n_head} heads (d_head {s.d_head}), "
        f"{r.params:,} parameters, the size rule's nearest to N_opt",
        f"  run        {r.steps:,} steps, {r.tokens:,} tokens = C / {r.flops_per_token:.4g} FLOPs per token, in whole "
        f"steps ({r.tokens / r.params:.1f} tokens per parameter)",
        f"  lr         {r.lr:.6g} ({plan.lr_source})",
    ]


def compute_command(args: argparse.Namespace) -> int:
    """`scalegpt plan --compute`: print the plan, and with --write the run's config."""
    if args.compute is None or args.from_dir is None:
        missing = "--from LADDER_DIR" if args.compute is not None else "--compute C"
        raise UserError(f"plan from an IsoFLOP ladder needs {missing} too: --compute C --from LADDER_DIR")
    out = Path(args.write) if args.write else None
    if out is not None and (out.exists() or out.is_symlink()):
        raise UserError(f"--write {out}: the file exists; give a new path or remove it first")
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--write {out}: the folder {out.parent} does not exist")
    ladder_dir = Path(args.from_dir)
    plan = plan_compute(args.config, args.overrides, args.compute, ladder_dir, args.gpus)
    for line in compute_lines(plan, ladder_dir):
        print(line, flush=True)
    if out is not None:
        atomic_write(out, to_yaml(plan.cfg))
        print(f"wrote {out}: `scalegpt train {out}` trains it (run.dir {plan.cfg.run.dir})", flush=True)
    return 0
