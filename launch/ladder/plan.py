"""The ladder's plan: the size rule (GPT-3 Table 2.1's shapes scaled down), each rung's token budget,
learning rate and config, all loaded and checked before the first rung trains, so a bad size or axis
value costs nothing."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ...model.config import ModelConfig
from ...model.flops import count_params, flops_per_token
from ...train.config.loading import load_config
from ...train.config.schema import Config
from ...train.errors import UserError
from ...train.schedule import Schedule, run_totals
from .options import DEFAULT_RUNGS

# Table 2.1's ranges, for saying where a rung departs from the paper's shapes.
PAPER_ASPECT = (43.0, 128.0)  # d_model / n_layer: Medium's 1024/24 to 6.7B's 4096/32
PAPER_D_HEAD = (64, 128)
PAPER_N_CTX = 2048
PAPER_VOCAB = 50257

RUNG_KEYS = (
    "run.dir",
    "model.n_layer",
    "model.d_model",
    "model.n_head",
    "optim.lr",
    "train.max_steps",
    "schedule.warmup_tokens",
    "schedule.decay_tokens",
    "schedule.ramp_tokens",
    "eval.every",
    "checkpoint.every",
)


# -- the size rule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeRule:
    """Table 2.1's shapes scaled down: n_layer = max(1, round(d_model / aspect)), heads of d_head."""

    aspect: float
    d_head: int

    def shape(self, size: str) -> Shape:
        """A rung's shape from `D` (d_model; the rule picks n_layer) or `LxD` (both given)."""
        text = size.strip().lower()
        layers_text, _, d_text = text.rpartition("x")
        try:
            d_model = int(d_text)
            n_layer = int(layers_text) if layers_text else max(1, round(d_model / self.aspect))
        except ValueError:
            raise UserError(f"--sizes {size!r}: give d_model (e.g. 128) or layers x d_model (e.g. 2x128)") from None
        if d_model <= 0 or n_layer <= 0:
            raise UserError(f"--sizes {size!r}: d_model and n_layer must be positive")
        if d_model % self.d_head:
            fits = [m * self.d_head for m in (d_model // self.d_head, d_model // self.d_head + 1) if m > 0]
            raise UserError(
                f"size {size} does not fit n_head: d_model={d_model} is not a multiple of the head width "
                f"d_head={self.d_head}, so no whole number of heads fills it; use "
                f"{' or '.join(map(str, fits))}, or another --d-head"
            )
        return Shape(n_layer=n_layer, d_model=d_model, n_head=d_model // self.d_head)

    def describe(self) -> str:
        return (
            f"n_layer = max(1, round(d_model / {self.aspect:g})), n_head = d_model / {self.d_head} "
            f"(d_head {self.d_head}), d_ff = 4 d_model"
        )


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int

    @property
    def name(self) -> str:
        return f"L{self.n_layer}-d{self.d_model}"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def departures(self) -> list[str]:
        """Where this shape leaves Table 2.1's ranges."""
        out = []
        aspect = self.d_model / self.n_layer
        if not PAPER_ASPECT[0] <= aspect <= PAPER_ASPECT[1]:
            out.append(f"d_model/n_layer {aspect:g} (paper {PAPER_ASPECT[0]:g}-{PAPER_ASPECT[1]:g})")
        if not PAPER_D_HEAD[0] <= self.d_head <= PAPER_D_HEAD[1]:
            out.append(f"d_head {self.d_head} (paper {PAPER_D_HEAD[0]}-{PAPER_D_HEAD[1]})")
        return out


def default_sizes(model: ModelConfig, rule: SizeRule) -> list[str]:
    """DEFAULT_RUNGS widths from the config's d_model down by factors of sqrt(2), each rounded to a
    multiple of d_head (at least one head); repeats dropped. Smallest first."""
    widths = {max(1, round(model.d_model / 2 ** (k / 2) / rule.d_head)) * rule.d_head for k in range(DEFAULT_RUNGS)}
    return [str(d) for d in sorted(widths)]


def shape_params(model: ModelConfig, shape: Shape) -> int:
    """Parameters N (model/flops.py's, all but the position embedding) of the config's model at `shape`."""
    return count_params(_at(model, shape), non_embedding=True)


def _at(model: ModelConfig, shape: Shape) -> ModelConfig:
    return replace(model, n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head)


# -- IsoFLOP sizes ---------------------------------------------------------------------------------------------
ISOFLOP_SIZES = 5
"""Sizes per budget when --isoflop is given without --sizes."""
CHINCHILLA_C_OVER_N2 = 120.0
"""C = 6·N·D with Chinchilla's D = 20·N gives C = 120·N²: the default sizes centre on N = sqrt(C / 120)."""
MIN_ISOFLOP_SIZES = 3
"""A parabola through the losses of one budget needs three sizes."""


def parse_isoflop(text: str) -> list[float]:
    """`--isoflop 1e12,3e12,1e13`: positive finite FLOP budgets, no repeats once written as %g (the rung
    directories' C=%g), smallest first."""
    values: list[float] = []
    for item in (t.strip() for t in text.split(",")):
        try:
            budget = float(item)
        except ValueError:
            raise UserError(
                f"--isoflop {text!r}: {item!r} is not a number; write FLOP budgets, e.g. 1e12,3e12,1e13"
            ) from None
        if not (math.isfinite(budget) and budget > 0):
            raise UserError(f"--isoflop {text!r}: every budget must be a positive number of FLOPs, got {item}")
        values.append(float(f"{budget:g}"))
    if len(set(values)) != len(values):
        raise UserError(f"--isoflop {text!r}: a budget is listed twice (budgets are compared to 6 digits)")
    return sorted(values)


def budget_label(budget: float) -> str:
    """An IsoFLOP budget's group label and directory name: C=1e+12."""
    return f"C={budget:g}"


def isoflop_sizes(model: ModelConfig, rule: SizeRule, budget: float, count: int = ISOFLOP_SIZES) -> list[str]:
    """`count` sizes of the size rule around Chinchilla's N = sqrt(C / 120), smallest first: the width
    (a multiple of d_head) whose parameters are nearest that guess in log, then, each way, the next width
    whose parameters are nearest sqrt(2) times (or over) the last, one width at least. Half the sizes sit
    below the guess and half above; where the narrowest width (one head) stops the walk down, the rest go
    above. Chinchilla's 20 tokens per parameter is only the centre: five sizes span about 4x in N, so an
    optimum at roughly 5 to 80 tokens per parameter stays inside them."""
    guess = math.sqrt(budget / CHINCHILLA_C_OVER_N2)
    widths: list[tuple[int, int]] = []  # (d_model, N), growing with d_model
    d = rule.d_head
    while len(widths) < 100_000:
        widths.append((d, shape_params(model, rule.shape(str(d)))))
        if widths[-1][1] > guess * 2 ** (count / 2 + 1) and len(widths) > count:
            break
        d += rule.d_head

    def nearest(target: float, lo: int, hi: int) -> int:
        return min(range(lo, hi), key=lambda j: abs(math.log(widths[j][1] / target)))

    chosen = [nearest(guess, 0, len(widths))]
    below = (count - 1) // 2
    while len(chosen) < count and below and chosen[0] > 0:  # down by sqrt(2) a step, as far as one head
        chosen.insert(0, nearest(widths[chosen[0]][1] / math.sqrt(2), 0, chosen[0]))
        below -= 1
    while len(chosen) < count and chosen[-1] + 1 < len(widths):
        chosen.append(nearest(widths[chosen[-1]][1] * math.sqrt(2), chosen[-1] + 1, len(widths)))
    return [str(widths[j][0]) for j in chosen]


# -- the plan --------------------------------------------------------------------------------------------
Budget = Literal["tokens_per_param", "tokens", "flops", "isoflop"]


@dataclass(frozen=True)
class RungInfo:
    """One model size of the ladder (for one --axis value), as ladder.json keeps it."""

    name: str
    axis_value: str | None
    dir: str
    """Relative to the ladder directory."""
    n_layer: int
    d_model: int
    n_head: int
    params: int
    """Parameters in model/flops.py's 6N: all but the position embedding (wte, tied, is the output layer)."""
    params_total: int
    flops_per_token: float
    steps: int
    tokens: int
    lr: float
    budget: float | None = None
    """--isoflop: the FLOPs budget this rung belongs to (its tokens are budget / flops_per_token, rounded up
    to whole steps); None in other ladders."""

    @property
    def label(self) -> str:
        return self.name if self.axis_value is None else f"{self.axis_value} {self.name}"

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RungInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # a missing key is a TypeError


@dataclass(frozen=True)
class Rung:
    info: RungInfo
    shape: Shape
    overrides: list[str]
    """Everything after CONFIG on the rung's `scalegpt train` line: the user's, the axis value's, the rung's."""
    axis_override: list[str]
    cfg: Config = field(compare=False)


@dataclass(frozen=True)
class Axis:
    key: str
    values: list[str]

    def label(self, value: str) -> str:
        return f"{self.key}={value}"


def parse_axis(spec: str) -> Axis:
    key, sep, values = spec.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    key = key.strip()
    if not sep or not key or not items:
        raise UserError(f"--axis {spec!r}: write KEY=V1,V2,... (for example model.n_ctx=64,128)")
    if key.startswith(RUNG_KEYS):
        raise UserError(
            f"--axis {key}: the ladder sets {key} for every rung itself (size rule, budget and schedule); "
            "use --sizes for model shapes, or put a fixed value in the config"
        )
    if len(set(items)) != len(items):
        raise UserError(f"--axis {spec!r}: a value is listed twice")
    return Axis(key, items)


SWEEP_KEY = "optim.lr"
"""The key --lr-sweep is an axis over (sweep.py reads its results)."""


def parse_sweep(text: str) -> list[str]:
    """`--lr-sweep 1e-3,3e-3`: positive finite numbers, no repeats, smallest first, each written as %g so
    that one learning rate has one rung directory however it was typed."""
    values: list[float] = []
    for item in (t.strip() for t in text.split(",")):
        try:
            lr = float(item)
        except ValueError:
            raise UserError(f"--lr-sweep {text!r}: {item!r} is not a number; write e.g. 1e-3,3e-3,1e-2") from None
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr-sweep {text!r}: every learning rate must be a positive number, got {item}")
        values.append(lr)
    if len(set(values)) != len(values):
        raise UserError(f"--lr-sweep {text!r}: a learning rate is listed twice")
    return [f"{v:g}" for v in sorted(values)]


@dataclass(frozen=True)
class LadderPlan:
    """Everything decided before the first rung trains; every rung's config is loaded and checked."""

    config: str
    overrides: list[str]
    ladder_dir: Path
    rule: SizeRule
    budget: Budget
    budget_value: float
    lr_exponent: float
    axis: Axis | None
    rungs: list[Rung]
    reference: Config = field(compare=False)
    isoflop: list[float] | None = None
    """--isoflop's budgets, smallest first; None in other ladders."""

    @property
    def sweep(self) -> bool:
        """Whether this ladder is a learning-rate sweep (--lr-sweep): its axis is optim.lr."""
        return self.axis is not None and self.axis.key == SWEEP_KEY

    def budget_text(self) -> str:
        if self.isoflop is not None:
            budgets = ", ".join(f"{b:.3g}" for b in self.isoflop)
            return f"IsoFLOP budgets {budgets} FLOPs, each size on budget / FLOPs per token"
        if self.budget == "tokens_per_param":
            return f"{self.budget_value:.4g} tokens per parameter"
        return f"{self.budget_value:.4g} {'tokens' if self.budget == 'tokens' else 'FLOPs'} per rung"


def _budget(args: argparse.Namespace, cfg: Config, world_size: int) -> tuple[Budget, float]:
    """Tokens or FLOPs per rung as given, else the config's own tokens per parameter."""
    for budget, value in (("tokens", args.tokens), ("flops", args.flops), ("tokens_per_param", args.tokens_per_param)):
        if value is not None:
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{budget.replace('_', '-')} must be a positive number, got {value}")
            return budget, float(value)  # type: ignore[return-value]
    return "tokens_per_param", run_totals(cfg, world_size).tokens / count_params(cfg.model, non_embedding=True)


@dataclass(frozen=True)
class _Recipe:
    """What every rung shares, taken from the reference config (the user's config and overrides)."""

    budget: Budget
    budget_value: float
    lr: float
    d_ref: int
    lr_exponent: float
    fractions: tuple[float, float, float]
    """schedule.warmup_tokens, decay_tokens and ramp_tokens over the config's tokens: the schedule's shape."""
    evals: int
    checkpoints: int
    world_size: int


def _recipe(args: argparse.Namespace, ref: Config, world_size: int) -> _Recipe:
    budget, value = _budget(args, ref, world_size)
    total = run_totals(ref, world_size).tokens
    s = ref.schedule
    for flag in ("evals", "checkpoints"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return _Recipe(
        budget=budget,
        budget_value=value,
        lr=ref.optim.lr,
        d_ref=ref.model.d_model,
        lr_exponent=args.lr_exponent,
        fractions=(s.warmup_tokens / total, s.decay_tokens / total, s.ramp_tokens / total),
        evals=args.evals,
        checkpoints=args.checkpoints,
        world_size=world_size,
    )


def _rung_overrides(shape: Shape, recipe: _Recipe, steps: int, tokens: int, lr: float, run_dir: Path) -> list[str]:
    warmup, decay, ramp = (round(f * tokens) for f in recipe.fractions)
    return [
        f"run.dir={run_dir}",
        f"model.n_layer={shape.n_layer}",
        f"model.d_model={shape.d_model}",
        f"model.n_head={shape.n_head}",
        f"optim.lr={lr:.6g}",
        f"train.max_steps={steps}",
        f"schedule.warmup_tokens={warmup}",
        f"schedule.decay_tokens={max(1, decay)}",
        f"schedule.ramp_tokens={ramp}",
        f"eval.every={max(1, math.ceil(steps / recipe.evals))}",
        f"checkpoint.every={max(1, math.ceil(steps / recipe.checkpoints))}",
    ]


def width_lr(cfg: Config, d_model: int, exponent: float) -> float:
    """The learning rate of a rung (and of `scalegpt plan --compute`'s run) at `d_model`: under
    mup, the config's optim.lr, which μP transfers across width unchanged; under standard, the ladder's
    rule, optim.lr x (config d_model / d_model)^exponent."""
    if cfg.model.parametrization == "mup":
        return cfg.optim.lr
    return cfg.optim.lr * (cfg.model.d_model / d_model) ** exponent


def _isoflop_tokens(budget: float, fpt: float, schedule: Schedule, shape: Shape) -> float:
    """budget / FLOPs per token, refused when it is less than one optimizer step: such a rung would train
    on a whole step anyway, at a multiple of its budget, and its point would not belong to the curve."""
    tokens = budget / fpt
    one_step = schedule.steps_to_reach(1).tokens
    if tokens < one_step:
        raise UserError(
            f"--isoflop budget {budget:g} FLOPs is too small for size {shape.name}: at {fpt:.4g} FLOPs per token "
            f"it buys {tokens:.3g} tokens, less than one optimizer step ({one_step:,} tokens); give budgets of at "
            f"least {one_step * fpt:.3g} FLOPs, or smaller --sizes"
        )
    return tokens


def budget_run(
    config: str,
    overrides: list[str],
    shape: Shape,
    budget_flops: float,
    lr: float,
    run_dir: Path,
    world_size: int,
) -> tuple[Config, RungInfo]:
    """The run an IsoFLOP rung of `shape` at `budget_flops` would be, at `lr` and in `run_dir`: the config's
    schedule shape over budget / FLOPs per token tokens (whole steps), loaded and checked. `scalegpt plan
    --compute` writes it for the size its fits choose."""
    args = argparse.Namespace(
        config=config,
        overrides=overrides,
        tokens=None,
        flops=None,
        tokens_per_param=None,
        evals=12,
        checkpoints=4,
        lr_exponent=0.0,
    )
    ref = load_config(config, overrides)
    recipe = replace(_recipe(args, ref, world_size), lr=lr, lr_exponent=0.0, budget="isoflop")
    rung = _plan_rung(args, recipe, shape, None, run_dir.parent, budget_flops)
    steps, tokens = rung.info.steps, rung.info.tokens
    final = [*overrides, *_rung_overrides(shape, recipe, steps, tokens, lr, run_dir)]
    return load_config(config, final), replace(rung.info, dir=str(run_dir), lr=float(f"{lr:.6g}"))


def _plan_rung(
    args: argparse.Namespace,
    recipe: _Recipe,
    shape: Shape,
    axis: tuple[Axis, str] | None,
    ladder_dir: Path,
    budget_flops: float | None = None,
) -> Rung:
    """One rung: its budget in steps, its learning rate, and its config loaded through load_config.
    `budget_flops` makes it a rung of an IsoFLOP curve: budget / FLOPs per token tokens, under C=BUDGET/."""
    axis_over = [f"{axis[0].key}={axis[1]}"] if axis else []
    base = load_config(args.config, [*args.overrides, *axis_over])
    model = _at(base.model, shape)
    n, fpt = count_params(model, non_embedding=True), flops_per_token(model)
    target = {"tokens": recipe.budget_value, "flops": recipe.budget_value / fpt}.get(recipe.budget)
    schedule = Schedule.from_config(base, world_size=recipe.world_size)
    if budget_flops is not None:
        target = _isoflop_tokens(budget_flops, fpt, schedule, shape)
    budget = schedule.steps_to_reach(recipe.budget_value * n if target is None else target)
    steps, tokens = budget.steps, budget.tokens
    if axis and axis[0].key == SWEEP_KEY:  # a learning-rate sweep: the same value at every width
        lr = float(axis[1])
    elif budget_flops is not None or base.model.parametrization == "mup":
        lr = width_lr(base, shape.d_model, recipe.lr_exponent)
    else:
        lr = recipe.lr * (recipe.d_ref / shape.d_model) ** recipe.lr_exponent
    rel = Path(axis[0].label(axis[1]).replace("/", "_")) / shape.name if axis else Path(shape.name)
    if budget_flops is not None:
        rel = Path(budget_label(budget_flops)) / shape.name
    overrides = [*args.overrides, *axis_over, *_rung_overrides(shape, recipe, steps, tokens, lr, ladder_dir / rel)]
    try:
        cfg = load_config(args.config, overrides)
    except UserError as exc:
        raise UserError(f"rung {rel}: {exc}") from None
    info = RungInfo(
        name=shape.name,
        axis_value=budget_label(budget_flops) if budget_flops else axis[0].label(axis[1]) if axis else None,
        dir=str(rel),
        n_layer=shape.n_layer,
        d_model=shape.d_model,
        n_head=shape.n_head,
        params=n,
        params_total=count_params(model),
        flops_per_token=fpt,
        steps=steps,
        tokens=tokens,
        lr=float(f"{lr:.6g}"),
        budget=budget_flops,
    )
    return Rung(info=info, shape=shape, overrides=overrides, axis_override=axis_over, cfg=cfg)


def _check_axis(args: argparse.Namespace, axis: Axis) -> None:

    for value in axis.values:
        try:
            load_config(args.config, [*args.overrides, f"{axis.key}={value}"])
        except UserError as exc:
            raise UserError(
                f"--axis {axis.key}={value}: {exc} (an axis is any config key, e.g. model.n_ctx or "
                "data.sources.0.weight)"
            ) from None


def plan_ladder(args: argparse.Namespace, world_size: int) -> LadderPlan:
    """Load and check every rung's config before anything trains, so a bad size or axis value costs
    nothing."""
    ref = load_config(args.config, args.overrides)
    if ref.eval.batches < 1:
        raise UserError("eval.batches must be at least 1: the ladder fits each rung's final validation loss")
    rule = SizeRule(
        aspect=args.aspect if args.aspect is not None else 64.0,
        d_head=args.d_head if args.d_head is not None else ref.model.d_head,
    )
    if rule.aspect <= 0 or rule.d_head <= 0:
        raise UserError("--aspect and --d-head must be positive")
    isoflop = getattr(args, "isoflop", None)
    if isoflop is not None:
        return _plan_isoflop(args, ref, rule, parse_isoflop(isoflop), world_size)
    shapes = _shapes(ref, rule, args.sizes or default_sizes(ref.model, rule))
    if args.lr_sweep is not None and args.axis:
        raise UserError("--lr-sweep is an axis over optim.lr: give it or --axis, not both")
    axis = Axis(SWEEP_KEY, parse_sweep(args.lr_sweep)) if args.lr_sweep is not None else None
    axis = parse_axis(args.axis) if args.axis else axis
    if axis is not None:
        _check_axis(args, axis)
    recipe = _recipe(args, ref, world_size)
    ladder_dir = Path(ref.run.dir)
    points = [(axis, v) for v in axis.values] if axis else [None]
    rungs = [_plan_rung(args, recipe, shape, point, ladder_dir) for point in points for shape in shapes]
    return LadderPlan(
        config=args.config,
        overrides=list(args.overrides),
        ladder_dir=ladder_dir,
        rule=rule,
        budget=recipe.budget,
        budget_value=recipe.budget_value,
        lr_exponent=recipe.lr_exponent,
        axis=axis,
        rungs=rungs,
        reference=ref,
    )


def _shapes(ref: Config, rule: SizeRule, sizes: list[str]) -> list[Shape]:
    """The shapes of `sizes`, smallest N first; a shape given twice is an error."""
    shapes = [rule.shape(s) for s in sizes]
    if len({s.name for s in shapes}) != len(shapes):
        raise UserError(f"--sizes gives the same shape twice: {' '.join(s.name for s in shapes)}")
    return sorted(shapes, key=lambda s: shape_params(ref.model, s))


def _plan_isoflop(
    args: argparse.Namespace, ref: Config, rule: SizeRule, budgets: list[float], world_size: int
) -> LadderPlan:
    """--isoflop: at each budget, each size on budget / FLOPs per token tokens (whole steps), under
    LADDER/C=BUDGET/. The sizes are --sizes at every budget, else isoflop_sizes of each budget."""
    if args.lr_sweep is not None or args.axis:
        raise UserError("--isoflop trains its own grid of budgets and sizes: give it, --axis or --lr-sweep, not more")
    recipe = replace(_recipe(args, ref, world_size), budget="isoflop", budget_value=max(budgets))
    ladder_dir = Path(ref.run.dir)
    rungs = []
    for budget in budgets:
        shapes = _shapes(ref, rule, args.sizes or isoflop_sizes(ref.model, rule, budget))
        planned = [_plan_rung(args, recipe, shape, None, ladder_dir, budget) for shape in shapes]  # budget checked
        if len(shapes) < MIN_ISOFLOP_SIZES:
            given = "--sizes gives" if args.sizes else f"the default sizes at {budget:g} FLOPs come to"
            raise UserError(
                f"--isoflop: {given} {len(shapes)} size(s) ({' '.join(s.name for s in shapes)}); a parabola per "
                f"budget needs at least {MIN_ISOFLOP_SIZES}: give more --sizes, or larger budgets"
            )
        rungs += planned
    return LadderPlan(
        config=args.config,
        overrides=list(args.overrides),
        ladder_dir=ladder_dir,
        rule=rule,
        budget="isoflop",
        budget_value=max(budgets),
        lr_exponent=recipe.lr_exponent,
        axis=None,
        rungs=rungs,
        reference=ref,
        isoflop=budgets,
    )


def describe_plan(plan: LadderPlan) -> list[str]:
    """The size rule, each rung's shape and budget, and where the shapes depart from Table 2.1."""
    ref = plan.reference
    lr_rule = f"lr = {ref.optim.lr:g} x ({ref.model.d_model} / d_model)^{plan.lr_exponent:g}"
    if ref.model.parametrization == "mup":
        lr_rule = f"lr = {ref.optim.lr:g} at every width (μP transfers it)"
    if plan.sweep:
        lr_rule = f"lr swept over {', '.join(plan.axis.values)} at every width"  # type: ignore[union-attr]
    lines = [
        f"ladder {plan.ladder_dir}: {len(plan.rungs)} rung(s), {plan.budget_text()}, {lr_rule}",
        f"size rule (GPT-3 Table 2.1 scaled down): {plan.rule.describe()}",
        f"{'rung':<28} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_head':>6} {'params':>10} "
        f"{'tokens':>11} {'steps':>6} {'FLOPs':>9} {'lr':>9}",
    ]
    for r in (rung.info for rung in plan.rungs):
        lines.append(
            f"{r.label:<28} {r.n_layer:>6} {r.d_model:>7} {r.n_head:>5} {r.d_model // r.n_head:>6} "
            f"{r.params:>10,} {r.tokens:>11,} {r.steps:>6} {r.flops:>9.3g} {r.lr:>9.3g}"
        )
    lines.append("departures from Table 2.1 (d_model/n_layer 43-128, d_head 64-128, n_ctx 2048, vocabulary 50257):")
    shapes = {rung.shape.name: rung.shape for rung in plan.rungs}  # once each, even with an axis
    for shape in shapes.values():
        if shape.departures():
            lines.append(f"  {shape.name}: {', '.join(shape.departures())}")
    m = ref.model
    if m.n_ctx != PAPER_N_CTX or m.vocab_size != PAPER_VOCAB:
        lines.append(f"  every rung: n_ctx {m.n_ctx}, vocabulary {m.vocab_size} (the config's data and context)")
    lines.append(
        "  and far fewer parameters and tokens: the paper's smallest model has 125M parameters and 300B tokens"
    )
    return lines


def plan_summary(plan: LadderPlan) -> dict[str, Any]:
    ref = plan.reference
    return {
        "config": plan.config,
        "overrides": plan.overrides,
        "size_rule": {"aspect": plan.rule.aspect, "d_head": plan.rule.d_head, "text": plan.rule.describe()},
        "budget": plan.budget,
        "budget_value": plan.budget_value,
        "budget_text": plan.budget_text(),
        "lr": {"reference": ref.optim.lr, "d_model": ref.model.d_model, "exponent": plan.lr_exponent},
        "axis": None if plan.axis is None else {"key": plan.axis.key, "values": plan.axis.values},
        "lr_sweep": plan.axis.values if plan.sweep else None,  # type: ignore[union-attr]
        "isoflop": plan.isoflop,
        "parametrization": ref.model.parametrization,
        "data": ", ".join(f"{s.name} {s.weight:g}" for s in ref.data.sources),
        "rungs": [vars(r.info) for r in plan.rungs],
    }
