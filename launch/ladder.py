"""`scalegpt ladder`: GPT-3's Figure 3.1 in miniature. Train a family of model sizes that share the
config's data, tokenizer, schedule shape and seed, then fit validation loss against training compute,
L(C) = a * C^(-b) (+ c), and against parameters, L(N), as Kaplan et al. 2020 do and the GPT-3 paper
(Section 3, Figure 3.1) follows.

The config names the top of the ladder: its model is the largest size by default, its token budget over
that model's parameters sets the tokens per parameter of every rung, and its optim.lr is that size's
learning rate. Each rung is an ordinary run directory under the ladder directory (the config's run.dir),
trained through `scalegpt train`, or `scalegpt launch` with `--launch ...`, so each can be sampled,
evaluated and resumed on its own; the ladder only decides what each rung is and whether it is done.

    LADDER/ladder.json              the plan, every rung's final losses and the fits
    LADDER/ladder.png               the figure (launch/ladder_plot.py)
    LADDER/L2-d128/                 a rung: config.yaml, metrics.jsonl, checkpoints/
    LADDER/model.n_ctx=256/L2-d128/ a rung of one value of --axis
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..model.flops import count_params, flops_per_token
from ..train.errors import UserError
from ..train.osutil import write_json_atomic

if TYPE_CHECKING:
    from ..model.config import ModelConfig
    from ..train.config.schema import Config
    from .ladder_fit import PowerLaw

    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

LADDER_JSON = "ladder.json"
LADDER_PNG = "ladder.png"

# Table 2.1's ranges, for saying where a rung departs from the paper's shapes.
PAPER_ASPECT = (43.0, 128.0)  # d_model / n_layer: Medium's 1024/24 to 6.7B's 4096/32
PAPER_D_HEAD = (64, 128)
PAPER_N_CTX = 2048
PAPER_VOCAB = 50257
DEFAULT_LR_EXPONENT = 1.0
"""lr = optim.lr x (d_ref / d_model)^1: narrower rungs take larger steps. Table 2.1's learning rates fall
about as fast with width (6e-4 at d_model 768 to 0.6e-4 at 12288, d_model^-0.83), and on the CPU ladder
this beat exponents 0 and 0.5 at every size tried (bench/RESULTS.md)."""
DEFAULT_RUNGS = 5
"""Rungs below the config's d_model by factors of sqrt(2), when --sizes is not given."""

# Keys that the ladder sets per rung; an --axis over one of them would fight the size rule or budget.
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

CAVEAT = (
    "These exponents describe these tiny models trained on this data with this recipe; they are not the "
    "GPT-3 paper's (its Figure 3.1 frontier is L = 2.57 * C^-0.048, C in PF-days, for models up to 175B "
    "parameters trained on 300B tokens) and do not predict them."
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


# -- the plan --------------------------------------------------------------------------------------------
Budget = Literal["tokens_per_param", "tokens", "flops"]


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

    @property
    def label(self) -> str:
        return self.name if self.axis_value is None else f"{self.axis_value} {self.name}"

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RungInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


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


def _config_tokens(cfg: Config, world_size: int) -> int:
    """Tokens the config trains on in its train.max_steps steps, through its batch ramp if any."""
    from ..train.schedule import Schedule

    sched = Schedule.from_config(cfg, world_size=world_size)
    if not cfg.schedule.ramp_tokens:
        return cfg.train.max_steps * sched.full_batch * cfg.model.n_ctx
    done = 0
    for _ in range(cfg.train.max_steps):
        done += sched.batch_size(done) * cfg.model.n_ctx
    return done


def steps_for_tokens(cfg: Config, tokens: float, world_size: int) -> tuple[int, int]:
    """(optimizer steps, the tokens they train on) to reach at least `tokens`, through the config's batch
    ramp step by step (Schedule.batch_size), since a ramped run's steps are not a division."""
    from ..train.schedule import Schedule

    sched = Schedule.from_config(cfg, world_size=world_size)
    if not cfg.schedule.ramp_tokens:
        per_step = sched.full_batch * cfg.model.n_ctx
        steps = max(1, math.ceil(tokens / per_step))
        return steps, steps * per_step
    steps = done = 0
    while done < tokens or steps == 0:
        done += sched.batch_size(done) * cfg.model.n_ctx
        steps += 1
    return steps, done


@dataclass(frozen=True)
class Plan:
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

    def budget_text(self) -> str:
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
    return "tokens_per_param", _config_tokens(cfg, world_size) / count_params(cfg.model, non_embedding=True)


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
    total = _config_tokens(ref, world_size)
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


def _plan_rung(
    args: argparse.Namespace, recipe: _Recipe, shape: Shape, axis: tuple[Axis, str] | None, ladder_dir: Path
) -> Rung:
    """One rung: its budget in steps, its learning rate, and its config loaded through load_config."""
    from ..train.config.loading import load_config

    axis_over = [f"{axis[0].key}={axis[1]}"] if axis else []
    base = load_config(args.config, [*args.overrides, *axis_over])
    model = replace(base.model, n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head)
    n, fpt = count_params(model, non_embedding=True), flops_per_token(model)
    target = {"tokens": recipe.budget_value, "flops": recipe.budget_value / fpt}.get(recipe.budget)
    steps, tokens = steps_for_tokens(base, recipe.budget_value * n if target is None else target, recipe.world_size)
    lr = recipe.lr * (recipe.d_ref / shape.d_model) ** recipe.lr_exponent
    rel = Path(axis[0].label(axis[1]).replace("/", "_")) / shape.name if axis else Path(shape.name)
    overrides = [*args.overrides, *axis_over, *_rung_overrides(shape, recipe, steps, tokens, lr, ladder_dir / rel)]
    try:
        cfg = load_config(args.config, overrides)
    except UserError as exc:
        raise UserError(f"rung {rel}: {exc}") from None
    info = RungInfo(
        name=shape.name,
        axis_value=axis[0].label(axis[1]) if axis else None,
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
    )
    return Rung(info=info, shape=shape, overrides=overrides, axis_override=axis_over, cfg=cfg)


def _check_axis(args: argparse.Namespace, axis: Axis) -> None:
    from ..train.config.loading import load_config

    for value in axis.values:
        try:
            load_config(args.config, [*args.overrides, f"{axis.key}={value}"])
        except UserError as exc:
            raise UserError(
                f"--axis {axis.key}={value}: {exc} (an axis is any config key, e.g. model.n_ctx or "
                "data.sources.0.weight)"
            ) from None


def make_plan(args: argparse.Namespace, world_size: int) -> Plan:
    """Load and check every rung's config before anything trains, so a bad size or axis value costs
    nothing."""
    from ..train.config.loading import load_config

    ref = load_config(args.config, args.overrides)
    if ref.eval.batches < 1:
        raise UserError("eval.batches must be at least 1: the ladder fits each rung's final validation loss")
    rule = SizeRule(
        aspect=args.aspect if args.aspect is not None else 64.0,
        d_head=args.d_head if args.d_head is not None else ref.model.d_head,
    )
    if rule.aspect <= 0 or rule.d_head <= 0:
        raise UserError("--aspect and --d-head must be positive")
    shapes = [rule.shape(s) for s in (args.sizes or default_sizes(ref.model, rule))]
    if len({s.name for s in shapes}) != len(shapes):
        raise UserError(f"--sizes gives the same shape twice: {' '.join(s.name for s in shapes)}")
    shapes.sort(key=lambda s: count_params(replace(ref.model, n_layer=s.n_layer, d_model=s.d_model, n_head=s.n_head)))
    axis = parse_axis(args.axis) if args.axis else None
    if axis is not None:
        _check_axis(args, axis)
    recipe = _recipe(args, ref, world_size)
    ladder_dir = Path(ref.run.dir)
    points = [(axis, v) for v in axis.values] if axis else [None]
    rungs = [_plan_rung(args, recipe, shape, point, ladder_dir) for point in points for shape in shapes]
    return Plan(
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


def describe_plan(plan: Plan) -> list[str]:
    """The size rule, each rung's shape and budget, and where the shapes depart from Table 2.1."""
    ref = plan.reference
    lines = [
        f"ladder {plan.ladder_dir}: {len(plan.rungs)} rung(s), {plan.budget_text()}, "
        f"lr = {ref.optim.lr:g} x ({ref.model.d_model} / d_model)^{plan.lr_exponent:g}",
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


# -- where each rung stands ------------------------------------------------------------------------------
Status = Literal["done", "partial", "submitted", "new"]


@dataclass(frozen=True)
class Outcome:
    """A rung's state on disk, and its validation curve so far."""

    info: RungInfo
    status: Status
    step: int
    """The step of its latest complete checkpoint (0 before the first)."""
    val_loss: float | None
    val_bpb: float | None
    curve: list[tuple[int, float]]
    """(tokens, validation loss) at each evaluation after step 0."""

    @property
    def finished(self) -> bool:
        return self.status == "done" and self.val_loss is not None


def outcome(ladder_dir: Path, info: RungInfo) -> Outcome:
    """Done means the latest complete checkpoint is at the rung's last step, so `scalegpt train` would
    find nothing to do; its last record then holds the final validation loss."""
    from ..train.checkpoint import find_latest
    from .plot import read_metrics

    run_dir = ladder_dir / info.dir
    latest = find_latest(run_dir)
    step = latest.step if latest is not None and latest.complete and latest.step is not None else 0
    records = read_metrics(run_dir)[0] if (run_dir / "metrics.jsonl").is_file() and step else []
    curve = [(int(r["tokens"]), float(r["val_loss"])) for r in records if _num(r.get("val_loss")) and r.get("tokens")]
    final = next((r for r in records if r["step"] == info.steps), {})
    if step >= info.steps:
        status: Status = "done"
    elif (run_dir / "sbatch.sh").is_file():
        status = "submitted"
    else:
        status = "partial" if step else "new"
    loss, bpb = final.get("val_loss"), final.get("val_bpb")
    return Outcome(info, status, step, float(loss) if _num(loss) else None, float(bpb) if _num(bpb) else None, curve)


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rung_config(rung: Rung, ladder_dir: Path) -> None:
    """A rung directory made with another config is another experiment: refuse it before the ladder
    counts it as done or resumes it, as the trainer itself would."""
    from ..train.loop import run_dir_differences

    rung_dir = ladder_dir / rung.info.dir
    diffs = run_dir_differences(rung_dir, rung.cfg)
    if diffs:
        raise UserError(
            f"rung {rung_dir} was made with a different config ({'; '.join(diffs[:3])}); give this "
            "ladder another run.dir, or remove that rung directory to train it again"
        )


# -- running a rung ----------------------------------------------------------------------------------------
def _run_local(config: str, overrides: list[str]) -> int:
    """`scalegpt train CONFIG overrides` in a child process, as a user would type it. SIGTERM and SIGUSR1
    go on to it, so it saves a checkpoint and stops; the ladder then stops after it."""
    argv = [sys.executable, "-m", "scalegpt", "train", config, *overrides]
    print(f"scalegpt: ladder: {shlex.join(['scalegpt', *argv[3:]])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too; let it exit before we do
        proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launch_namespace(config: str, launch_args: list[str]) -> argparse.Namespace:
    """`--launch ...` read by `scalegpt launch`'s own parser, so every launch option means what it means there."""
    from .cli import build_parser

    ns, extra = build_parser().parse_known_args(["launch", config, *launch_args])
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        raise UserError(f"--launch: unrecognized arguments: {' '.join(bad)} (see `scalegpt launch --help`)")
    if extra or ns.overrides:
        raise UserError("--launch takes launch options only; put key=value overrides before --launch")
    if not (ns.procs is not None or ns.gpus is not None or ns.hostfile is not None or ns.slurm):
        raise UserError("--launch needs where to run each rung: --procs N, --gpus N, --hostfile FILE or --slurm")
    return ns


def _world_size(ns: argparse.Namespace | None, cfg: Config) -> int:
    """Ranks per rung, which sets the global batch when train.global_batch is 0."""
    if ns is None:
        return 1
    if ns.procs is not None or ns.gpus is not None:
        return ns.procs if ns.procs is not None else ns.gpus
    if not cfg.train.global_batch:
        raise UserError(
            "with --hostfile or --slurm the ladder needs train.global_batch set (not 0): each rung's token "
            "budget is counted in whole steps before the jobs start"
        )
    return 1


def run_rung(plan: Plan, rung: Rung, launch: argparse.Namespace | None) -> int:
    if launch is None:
        return _run_local(plan.config, rung.overrides)
    from .launcher import launch_command

    return launch_command(replace_namespace(launch, overrides=list(rung.overrides)))


def replace_namespace(ns: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(ns), **changes})


def prepare_data(plan: Plan) -> None:
    """`scalegpt prepare` once per distinct data section (an --axis over data.* may change it). It does
    nothing when the prepared data are up to date, so a clean clone and a re-run take the same path."""
    done: list[Any] = []
    for rung in plan.rungs:
        if rung.cfg.data in done:
            continue
        done.append(rung.cfg.data)
        argv = [sys.executable, "-m", "scalegpt", "prepare", plan.config, *plan.overrides, *rung.axis_override]
        code = subprocess.run(argv).returncode
        if code != 0:
            raise UserError(f"`scalegpt prepare {plan.config}` failed (exit code {code}); see its message above")


# -- fits and the summary ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupFit:
    """The fits of one frontier: the whole ladder, or one --axis value."""

    axis_value: str | None
    points: int
    loss_vs_compute: list[PowerLaw]
    loss_vs_params: list[PowerLaw]
    bpb_vs_compute: list[PowerLaw]
    loss_falls_with_size: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "axis_value": self.axis_value,
            "points": self.points,
            "loss_vs_compute": [f.to_json() for f in self.loss_vs_compute],
            "loss_vs_params": [f.to_json() for f in self.loss_vs_params],
            "bpb_vs_compute": [f.to_json() for f in self.bpb_vs_compute],
            "loss_falls_with_size": self.loss_falls_with_size,
            "note": self.note,
        }


def fit_group(axis_value: str | None, outcomes: list[Outcome]) -> GroupFit:
    """Fit the finished rungs of one frontier: final validation loss (and bits per byte) against the
    rung's training FLOPs C, and against its parameters N."""
    from .ladder_fit import fit_both

    done = sorted((o for o in outcomes if o.finished), key=lambda o: o.info.params)
    losses = [o.val_loss for o in done if o.val_loss is not None]
    falls = all(a > b for a, b in zip(losses, losses[1:], strict=False))
    if len(done) < 2:
        note = f"{len(done)} finished rung(s): a fit needs at least 2"
        return GroupFit(axis_value, len(done), [], [], [], falls, note)
    flops = [o.info.flops for o in done]
    bpbs = [o.val_bpb for o in done]
    by_bpb = fit_both(flops, bpbs) if all(b is not None for b in bpbs) else []  # type: ignore[arg-type]
    return GroupFit(
        axis_value=axis_value,
        points=len(done),
        loss_vs_compute=fit_both(flops, losses),
        loss_vs_params=fit_both([o.info.params for o in done], losses),
        bpb_vs_compute=by_bpb,
        loss_falls_with_size=falls,
    )


def fit_all(outcomes: list[Outcome]) -> list[GroupFit]:
    groups: dict[str | None, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.info.axis_value, []).append(o)
    return [fit_group(value, group) for value, group in groups.items()]


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
    from .ladder_plot import ladder_figure
    from .plot import save_png

    infos = [RungInfo.from_json(r) for r in summary["rungs"]]
    outcomes = [outcome(ladder_dir, info) for info in infos]
    fits = fit_all(outcomes)
    summary = {
        **summary,
        "rungs": [
            {**vars(o.info), "status": o.status, "step": o.step, "val_loss": o.val_loss, "val_bpb": o.val_bpb}
            for o in outcomes
        ],
        "fits": [g.to_json() for g in fits],
        "caveat": CAVEAT,
    }
    if write:
        write_json_atomic(ladder_dir / LADDER_JSON, summary)
    lines = summary_lines(outcomes, fits)
    if not any(o.finished for o in outcomes):
        return lines, None
    out = png or ladder_dir / LADDER_PNG
    save_png(ladder_figure(outcomes, fits, title=_title(ladder_dir, summary), caveat=CAVEAT), out)
    return lines, out


def _title(ladder_dir: Path, summary: dict[str, Any]) -> str:
    return f"{ladder_dir.name}: {summary.get('budget_text', '')}, data {summary.get('data', '?')}"


def plan_summary(plan: Plan) -> dict[str, Any]:
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
        "data": ", ".join(f"{s.name} {s.weight:g}" for s in ref.data.sources),
        "rungs": [vars(r.info) for r in plan.rungs],
    }


# -- the command ---------------------------------------------------------------------------------------------
def _say(line: str) -> None:
    print(line, flush=True)


def _train_pending(plan: Plan, launch: argparse.Namespace | None, summary: dict[str, Any]) -> list[Rung]:
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
    """Entry point of `scalegpt ladder` (parser: add_parser below)."""
    from ..train.config.loading import load_config

    started = time.monotonic()
    if args.sizes:  # `--sizes 64 128 run.dir=x`: argparse gives the override to --sizes; it is an override
        args.overrides = [*args.overrides, *(s for s in args.sizes if "=" in s)]
        args.sizes = [s for s in args.sizes if "=" not in s]
    launch = _launch_namespace(args.config, args.launch) if args.launch is not None else None
    world = _world_size(launch, load_config(args.config, args.overrides))
    plan = make_plan(args, world)
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
    _say(f"wrote {plan.ladder_dir / LADDER_JSON}" + (f" and {png}" if png else ""))
    _say(f"note: {CAVEAT}")
    return 0


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
    _say(f"wrote {png}")
    return 0


def add_parser(sub: _Subparsers) -> argparse.ArgumentParser:
    """`scalegpt ladder`'s arguments; launch/cli.py registers it."""
    s = sub.add_parser(
        "ladder",
        help="a scaling-law ladder: train several model sizes, fit loss against compute (GPT-3 Figure 3.1)",
        description=__doc__.split("\n\n")[0],
    )
    s.add_argument("config", help="run YAML; its model is the top rung, e.g. configs/ladder-cpu.yaml")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. run.dir=runs/my-ladder")
    s.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="SIZE",
        help="d_model of each rung (the size rule picks layers and heads) or LAYERSxD_MODEL; default: "
        f"{DEFAULT_RUNGS} widths from the config's d_model down by factors of sqrt(2)",
    )
    budget = s.add_mutually_exclusive_group()
    budget.add_argument(
        "--tokens", type=float, default=None, metavar="T", help="train every rung on T tokens (as GPT-3 did)"
    )
    budget.add_argument(
        "--flops", type=float, default=None, metavar="C", help="train every rung for C FLOPs (an isoFLOP ladder)"
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
        "--launch",
        nargs=argparse.REMAINDER,
        default=None,
        help="last: run each rung through `scalegpt launch` with these options (--procs N, --gpus N, "
        "--hostfile F or --slurm, and the rest of launch's options)",
    )
    return s
