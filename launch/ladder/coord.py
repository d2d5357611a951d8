"""`scalegpt ladder CONFIG --coord-check`: the μP paper's coordinate check (Yang et al. 2022, Figure 5).

Train a few steps at several widths, depth and head count fixed, under both parametrizations, and record
the mean absolute value of each layer's output at every step: the embedding output, each block's
attention and MLP outputs, the final LayerNorm and the logits. Under μP no layer's size should drift with
width; under the standard parametrization the logits grow with it, which is why its best learning rate
moves as a model widens.

It runs in this process, in plain PyTorch: the models come from model/gpt.py's build_model, the
optimizer is torch's AdamW over train/engine.py's own param_groups (so the μP groups and their lr_scale
are the trainer's), and set_lr applies the learning rate. The learning rate is constant (no warmup, which
would make the first steps too small to show anything) and gradients are not clipped, so each step moves
the weights as far as the parametrization allows. Every width sees the same batches, the first steps of
the config's data, and starts from the config's seed.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure

from ...model.config import PARAMETRIZATIONS, ModelConfig
from ...model.gpt import GPT, build_model
from ...train.config.loading import load_config
from ...train.config.schema import Config
from ...train.data.mixture import Mixture
from ...train.engine import param_groups, set_lr
from ...train.errors import UserError
from ...train.osutil import write_json_atomic
from .. import plot
from .run import prepare_once

COORD_JSON = "coord.json"
COORD_PNG = "coord.png"
_RUNG_FLAGS = {"--sizes": "sizes", "--lr-sweep": "lr_sweep", "--axis": "axis", "--launch": "launch"}


def parse_widths(text: str) -> list[int]:
    """`--widths 64,128,256`: positive integers, no repeats, returned smallest first."""
    widths = []
    for item in (t.strip() for t in text.split(",")):
        try:
            w = int(item)
        except ValueError:
            raise UserError(f"--widths {text!r}: {item!r} is not a whole number; write e.g. 64,128,256") from None
        if w <= 0:
            raise UserError(f"--widths {text!r}: every width must be positive, got {w}")
        widths.append(w)
    if len(widths) < 2 or len(set(widths)) != len(widths):
        raise UserError(f"--widths {text!r}: give at least two different widths, e.g. 64,128,256")
    return sorted(widths)


def width_config(model: ModelConfig, width: int, parametrization: str, base: int) -> ModelConfig:
    """The config's model at `width`, depth and head count unchanged; under mup scaled from `base`."""
    mup = parametrization == "mup"
    try:
        return replace(
            model,
            d_model=width,
            d_ff=0,
            parametrization=parametrization,
            mup_base_d_model=base if mup else None,
            mup_base_d_head=None,
            init_from=None,
        )
    except ValueError as exc:  # ModelConfig names the field and the problem
        raise UserError(f"--widths {width} under {parametrization}: model.{exc}") from None


def layer_modules(model: GPT) -> dict[str, torch.nn.Module]:
    """The modules whose outputs the check records, by the name coord.json gives them, in forward order."""
    t = model.transformer
    out: dict[str, torch.nn.Module] = {"embedding": t.drop}
    for i, block in enumerate(t.h):
        out[f"block{i}.attn"] = block.attn
        out[f"block{i}.mlp"] = block.mlp
    out["ln_f"] = t.ln_f
    return out


def mean_abs(t: torch.Tensor) -> float:
    """The size of a layer's coordinates, as the coordinate check plots it: the mean of |x|."""
    return float(t.detach().abs().mean())


@dataclass
class WidthRun:
    parametrization: str
    width: int
    sizes: dict[str, list[float]]
    """Layer -> mean |output| at each step's forward pass (step 1 is the initialization)."""
    losses: list[float]


def train_width(cfg: Config, mcfg: ModelConfig, batches: list[torch.Tensor]) -> WidthRun:
    """`len(batches)` AdamW steps of one width, recording every layer's size in each step's forward pass."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(mcfg, seed=cfg.run.seed)
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    set_lr(opt, o.lr)
    sizes: dict[str, list[float]] = {name: [] for name in [*layer_modules(model), "logits"]}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: sizes[name].append(mean_abs(out)))
        for name, module in layer_modules(model).items()
    ]
    losses = []
    try:
        for batch in batches:
            logits, _ = model(batch[:, :-1])
            assert logits is not None
            sizes["logits"].append(mean_abs(logits))
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return WidthRun(mcfg.parametrization, mcfg.d_model, sizes, losses)


def growth(runs: list[WidthRun], layer: str) -> float:
    """The last step's size at the widest model over the narrowest: how much the layer drifts with width."""
    by_width = sorted(runs, key=lambda r: r.width)
    return by_width[-1].sizes[layer][-1] / by_width[0].sizes[layer][-1]


def _check_widths(cfg: Config, widths: list[int]) -> None:
    n_head = cfg.model.n_head
    bad = [w for w in widths if w % n_head]
    if bad:
        raise UserError(
            f"--widths: {', '.join(map(str, bad))} not divisible by model.n_head={n_head} (the check keeps the "
            f"head count fixed); use multiples of {n_head}, or set model.n_head"
        )


def coord_figure(runs: list[WidthRun], layers: list[str], title: str) -> Figure:
    """One panel per parametrization: each layer's size at the last step against width, log-log."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, len(PARAMETRIZATIONS), sharey=True)
    cmap = colormaps["viridis"]
    for ax, p in zip(axes, PARAMETRIZATIONS, strict=True):
        mine = sorted((r for r in runs if r.parametrization == p), key=lambda r: r.width)
        widths = [r.width for r in mine]
        for i, layer in enumerate(layers):
            color = "k" if layer == "logits" else cmap(0.9 * i / max(1, len(layers) - 2))
            ax.plot(widths, [r.sizes[layer][-1] for r in mine], "-o", color=color, lw=1.4, ms=4, label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("width d_model")
        ax.set_title(f"{p}{' (μP)' if p == 'mup' else ''}")
    axes[0].set_ylabel("mean |activation| at the last step")
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return fig


def coord_command(args: argparse.Namespace) -> int:
    """`scalegpt ladder CONFIG --coord-check`: train, write coord.json and coord.png, print the growth table."""
    started = time.monotonic()
    ignored = [flag for flag, given in _RUNG_FLAGS.items() if getattr(args, given) is not None]
    if ignored:  # refused, not ignored: the check trains no rungs, so these would silently do nothing
        raise UserError(f"--coord-check trains no rungs, so it takes no {', '.join(ignored)}; use --widths")
    widths = parse_widths(args.widths)
    if args.coord_steps < 1:
        raise UserError(f"--coord-steps must be at least 1, got {args.coord_steps}")
    cfg = load_config(args.config, args.overrides)
    _check_widths(cfg, widths)
    base = widths[0]
    models = [width_config(cfg.model, w, p, base) for p in PARAMETRIZATIONS for w in widths]  # checked before training
    out_dir = Path(cfg.run.dir)
    prepare_once(args.config, args.overrides)
    mixture = Mixture.for_config(cfg)
    b = cfg.train.micro_batch
    batches = [mixture.batch(range(s * b, (s + 1) * b)) for s in range(args.coord_steps)]
    print(
        f"coordinate check: widths {', '.join(map(str, widths))}, {cfg.model.n_layer} layer(s), "
        f"{cfg.model.n_head} heads, {args.coord_steps} AdamW steps of {b} x {cfg.model.n_ctx} tokens at lr "
        f"{cfg.optim.lr:g}; mup scales from d_model {base}",
        flush=True,
    )
    runs: list[WidthRun] = []
    for mcfg in models:
        t0 = time.monotonic()
        runs.append(train_width(cfg, mcfg, batches))
        print(
            f"  {mcfg.parametrization:<8} d_model {mcfg.d_model:>5}: loss {runs[-1].losses[-1]:.4f} "
            f"({time.monotonic() - t0:.1f} s)",
            flush=True,
        )
    layers = list(runs[0].sizes)
    summary = _summary(args, cfg, widths, layers, runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / COORD_JSON, summary)
    title = f"coordinate check: {cfg.model.n_layer} layers, {args.coord_steps} steps at lr {cfg.optim.lr:g}"
    plot.save_png(coord_figure(runs, layers, title), out_dir / COORD_PNG)
    for line in growth_table(summary):
        print(line)
    print(f"wrote {out_dir / COORD_JSON} and {out_dir / COORD_PNG} in {time.monotonic() - started:.0f} s")
    return 0


def _summary(
    args: argparse.Namespace, cfg: Config, widths: list[int], layers: list[str], runs: list[WidthRun]
) -> dict[str, Any]:
    return {
        "config": args.config,
        "overrides": list(args.overrides),
        "widths": widths,
        "steps": args.coord_steps,
        "lr": cfg.optim.lr,
        "batch": cfg.train.micro_batch,
        "n_ctx": cfg.model.n_ctx,
        "n_layer": cfg.model.n_layer,
        "n_head": cfg.model.n_head,
        "seed": cfg.run.seed,
        "mup_base_d_model": widths[0],
        "layers": layers,
        "statistic": "mean |x| of each layer's output in each step's forward pass (step 1: at initialization)",
        "records": [
            {"parametrization": r.parametrization, "width": r.width, "layer": layer, "sizes": r.sizes[layer]}
            for r in runs
            for layer in layers
        ],
        "losses": [{"parametrization": r.parametrization, "width": r.width, "losses": r.losses} for r in runs],
        "growth": {
            p: {layer: growth([r for r in runs if r.parametrization == p], layer) for layer in layers}
            for p in PARAMETRIZATIONS
        },
    }


def growth_table(summary: dict[str, Any]) -> list[str]:
    """Each layer's last-step size at the widest model over the narrowest, under each parametrization."""
    w = summary["widths"]
    lines = [f"size at d_model {w[-1]} over size at d_model {w[0]} (last step; 1 = no drift with width):"]
    lines.append(f"  {'layer':<14}" + "".join(f"{p:>10}" for p in PARAMETRIZATIONS))
    for layer in summary["layers"]:
        cells = "".join(f"{summary['growth'][p][layer]:>10.3g}" for p in PARAMETRIZATIONS)
        lines.append(f"  {layer:<14}{cells}")
    worst = max(abs(math.log(v)) for v in summary["growth"]["mup"].values())
    lines.append(f"  under mup the largest drift of any layer is {math.exp(worst):.3g}x")
    return lines
