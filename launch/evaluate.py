"""`scalegpt eval`: few-shot accuracy on the built-in tasks, validation loss / perplexity / bits per byte,
and optionally lm-evaluation-harness tasks, for a run, checkpoint or export directory.

The results go to the console as tables, to --json FILE (written atomically) and, with --wandb, to
wandb tables beside the run's config. The work lives in scalegpt.train.evaluation; this module reads
the arguments, checks them before any weights are loaded, and reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..train.data.mixture import read_manifest
from ..train.data.tokenizer import tokenizer_hash
from ..train.engine import pick_device
from ..train.errors import UserError, check_writable_file
from ..train.evaluation.contamination import (
    TaskContamination,
    check_plans,
    contamination_table,
    split_results,
    trained_sources,
)
from ..train.evaluation.fewshot import FEW, ShotResult, Shots, TaskPlan, plan_tasks, run_plans
from ..train.evaluation.report import (
    fewshot_table,
    log_eval_tables,
    task_descriptions,
    validation_table,
)
from ..train.evaluation.tasks import Task, get_tasks
from ..train.evaluation.validation import open_validation_data, validation_metrics
from ..train.metrics import MetricsLog
from ..train.osutil import write_json_atomic
from ..train.rundir import METRICS
from ..train.weights import ResolvedPath, load_for_inference, read_run_config, read_tokenizer, resolve

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import nn

    from ..train.data.mixture import Mixture

DEFAULT_SHOTS: tuple[Shots, ...] = (0, 1, FEW)


def parse_shots(values: list[str] | None) -> list[Shots]:
    """--shots values: non-negative integers or 'few' (default 0 1 few), duplicates dropped."""
    if not values:
        return list(DEFAULT_SHOTS)
    out: list[Shots] = []
    for v in values:
        if v.strip().lower() == FEW:
            k: Shots = FEW
        else:
            try:
                k = int(v)
            except ValueError:
                raise UserError(f"--shots takes non-negative integers or 'few', got {v!r}") from None
            if k < 0:
                raise UserError(f"--shots takes non-negative integers or 'few', got {k}")
        if k not in out:
            out.append(k)
    return out


def _check_args(args: argparse.Namespace) -> tuple[list[Task], list[Shots]]:
    """Everything that can be checked before loading weights, so a typo costs nothing."""
    if args.tasks == []:  # `--tasks` and nothing after it: a forgotten list, not a request for every task
        raise UserError("--tasks needs at least one task name (see scalegpt eval --help); leave it out for every task")
    tasks = [] if args.tasks is None and args.lm_eval else get_tasks(args.tasks)
    shots = parse_shots(args.shots)
    for flag, value, low in (
        ("--num-examples", args.num_examples, 1),
        ("--batch-size", args.batch_size, 1),
        ("--few-max", args.few_max, 0),
        ("--val-batches", args.val_batches, 0),
    ):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.json_out is not None:  # found now, not after the whole evaluation has run
        check_writable_file(args.json_out, "--json")
    if args.lm_eval:
        from ..train.evaluation.harness import HAVE_LM_EVAL  # imports lm-eval (seconds): only with --lm-eval

        if not HAVE_LM_EVAL:
            raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'scalegpt[eval]' (or lm-eval)")
    if args.contamination and not tasks:
        raise UserError("--contamination splits the built-in tasks' accuracy; name some with --tasks")
    pick_device(args.device)
    return tasks, shots


def _checkpoint_meta(resolved: ResolvedPath) -> dict[str, Any]:
    """Step and tokens of the checkpoint being evaluated, when it records them (scalegpt.json)."""
    meta: dict[str, Any] = {"kind": resolved.kind, "weights": str(resolved.weights_dir)}
    f = resolved.weights_dir / "scalegpt.json"
    try:
        saved = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        saved = {}
    meta.update({k: saved[k] for k in ("step", "tokens") if k in saved})
    meta["run_dir"] = None if resolved.run_dir is None else str(resolved.run_dir)
    return meta


def _say(text: str = "") -> None:
    print(text, flush=True)


def _before_weights(
    args: argparse.Namespace, resolved: ResolvedPath, tasks: list[Task], shots: list[Shots]
) -> tuple[Mixture | None, str, list[TaskPlan], Contamination | None]:
    """The validation data, the task plans and (with --contamination) which queries are dirty, from the
    config and tokenizer alone, so a K that does not fit n_ctx or a missing data folder fails before the
    weights are read."""
    cfg, tokenizer = read_run_config(resolved), read_tokenizer(resolved)
    mixture, data_note = (None, "validation skipped (--val-batches 0)")
    if args.val_batches:
        mixture, data_note = open_validation_data(cfg, tokenizer, args.data_dir)
    plans = plan_tasks(
        tasks,
        tokenizer,
        cfg.model.n_ctx,
        shots=shots,
        num_examples=args.num_examples,
        seed=args.seed,
        few_max=args.few_max,
    )
    contamination = _mark_contamination(args, cfg, tokenizer, plans) if args.contamination else None
    return mixture, data_note, plans, contamination


Contamination = tuple[list[TaskContamination], dict[str, Any]]
"""Each task's dirty queries, and the index they were looked up in."""


def _mark_contamination(
    args: argparse.Namespace, cfg: Any, tokenizer: Tokenizer, plans: list[TaskPlan]
) -> Contamination:
    """--contamination: each planned query marked dirty or clean against the text the run trained on,
    the train splits of its sources in its prepared data (--data-dir, default the config's data.dir)."""
    where = Path(args.data_dir or cfg.data.dir).expanduser()
    manifest = read_manifest(where)
    if manifest is None:
        raise UserError(
            f"--contamination needs the data the run trained on, and {where} has no manifest.json; "
            "run `scalegpt prepare CONFIG` or pass --data-dir"
        )
    if manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise UserError(f"the data in {where} were made by another tokenizer than the run's; pass the run's --data-dir")
    weights = [
        {s.name: s.weight for s in cfg.data.sources},
        *({k: float(v) for k, v in st.weights.items()} for st in cfg.data.stages),
    ]
    if not any(weights[0]):  # a config without sources trains on prepare's weights
        weights = [{e["name"]: float(e["weight"]) for e in manifest["sources"]}]
    sources = trained_sources(manifest, weights)
    if not sources:
        raise UserError(f"none of the run's sources ({', '.join(weights[0])}) is prepared in {where}; pass --data-dir")
    _say(f"contamination: looking the queries up in the train splits of {', '.join(sources)} in {where}")
    return check_plans(plans, where, manifest, sources, _say)


def _run_fewshot(
    args: argparse.Namespace, model: nn.Module, tokenizer: Tokenizer, plans: list[TaskPlan], tasks: list[Task]
) -> list[ShotResult]:
    if not plans:
        return []
    results = run_plans(model, tokenizer, plans, batch_size=args.batch_size)
    _say(f"\nfew-shot accuracy (GPT-3 Section 2.4; seed {args.seed})")
    _say(fewshot_table(results))
    _say(task_descriptions([t.name for t in tasks]))
    return results


def _report_contamination(results: list[ShotResult], contamination: Contamination | None) -> dict[str, Any] | None:
    """Accuracy on all, clean and dirty queries (GPT-3 Figure 4.2, Table C.1), printed and returned for
    the JSON report."""
    if contamination is None:
        return None
    marks, index = contamination
    splits = split_results(results, marks)
    _say(
        "\ncontamination (GPT-3 Section 4, Appendix C): a query is dirty when one of its N-word grams occurs in "
        "the training text"
    )
    _say(contamination_table(splits, marks))
    return {"index": index, "tasks": [m.row() for m in marks], "results": [s.row() for s in splits]}


def _run_validation(
    args: argparse.Namespace, model: nn.Module, mixture: Mixture | None, data_note: str
) -> dict[str, dict[str, float]]:
    _say(f"\n{data_note}")
    if mixture is None:
        return {}
    validation = validation_metrics(model, mixture, batch_size=args.batch_size, max_batches=args.val_batches)
    if validation:
        _say(validation_table(validation))
        warning = mixture.validation_weights().warning()
        if warning is not None:
            _say(f"scalegpt: {warning}")
    else:
        _say("(no source has a validation split; prepare with data.val_fraction > 0)")
    return validation


def _run_lm_eval(args: argparse.Namespace, model: nn.Module, tokenizer: Tokenizer) -> dict[str, dict[str, float]]:
    if not args.lm_eval:
        return {}
    from ..train.evaluation.harness import ScalegptLM, run_lm_eval  # imports lm-eval (seconds): only with --lm-eval

    lm = ScalegptLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size)
    results = run_lm_eval(lm, args.lm_eval, include_path=args.lm_eval_include, limit=args.num_examples, seed=args.seed)
    _say("\nlm-evaluation-harness")
    for task, metrics in results.items():
        _say(f"  {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return results


def eval_command(args: argparse.Namespace) -> int:
    """Entry point of `scalegpt eval` (parser in launch/cli.py)."""
    tasks, shots = _check_args(args)
    resolved = resolve(args.path)
    meta = _checkpoint_meta(resolved)
    mixture, data_note, plans, contamination = _before_weights(args, resolved, tasks, shots)

    model, tokenizer, cfg = load_for_inference(args.path, device=args.device)
    params = sum(p.numel() for p in model.parameters())
    step = f"step {meta['step']}, " if "step" in meta else ""
    device = next(model.parameters()).device
    _say(f"evaluating {args.path} ({step}{params:,} parameters, n_ctx {cfg.model.n_ctx}, {device.type})")

    results = _run_fewshot(args, model, tokenizer, plans, tasks)
    contaminated = _report_contamination(results, contamination)
    validation = _run_validation(args, model, mixture, data_note)
    lm_eval_results = _run_lm_eval(args, model, tokenizer)
    report = {
        "model": str(args.path),
        **meta,
        "parameters": params,
        "n_ctx": cfg.model.n_ctx,
        "seed": args.seed,
        "num_examples": args.num_examples,
        "shots": list(shots),
        "fewshot": [r.row() for r in results],
        "validation": {"note": data_note, "metrics": validation},
        "lm_eval": lm_eval_results,
    }
    if contaminated is not None:
        report["contamination"] = contaminated
    if args.json_out is not None:
        write_json_atomic(args.json_out, report)
        _say(f"\nwrote {args.json_out}")
    if args.wandb:
        _log_to_wandb(meta, cfg, results, validation)
    return 0


def _log_to_wandb(
    meta: dict[str, Any], cfg: Any, results: list[ShotResult], validation: dict[str, dict[str, float]]
) -> None:
    """A wandb run with the model's config and the eval tables (offline when no API key is set)."""
    where = Path(meta["run_dir"] or meta["weights"])
    had_metrics = (where / METRICS).exists()
    name = f"{cfg.run.name or where.name} eval"
    log = MetricsLog(where, replace(cfg, log=replace(cfg.log, wandb=True), run=replace(cfg.run, name=name)))
    try:
        log_eval_tables(log, results, validation)
    finally:
        log.close()
        stray = where / METRICS
        if not had_metrics and stray.is_file() and stray.stat().st_size == 0:
            stray.unlink()  # MetricsLog opens one; an export directory should not gain an empty file
    print(f"logged the tables to wandb run {name!r} (files under {where / 'wandb'})", file=sys.stderr)
