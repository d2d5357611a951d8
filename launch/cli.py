"""`scalegpt`: one entry point for prepare, train, launch, sample, eval, export, plan and plot.

The parser and the dispatch, nothing else: each sub-command's parser is built here (launch's in
launch/options.py, since the ladder's --launch reads it too; the ladder's in launch/ladder/options.py);
its work lives in the module that owns it, imported only when that command runs. Bad input of any kind
becomes one line, `scalegpt: error: ...`, and exit code 2. No module of ours imports this one.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..train.errors import QUIET_INTERRUPT, SharedUserError, UserError
from .ladder.options import add_parser as add_ladder_parser
from .options import Parser, add_launch_parser, with_config

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# command -> (module, function); the function takes the parsed argparse.Namespace.
HANDLERS: dict[str, tuple[str, str]] = {
    "prepare": ("scalegpt.train.data.prepare", "prepare_command"),
    "train": ("scalegpt.train.loop", "train_command"),
    "launch": ("scalegpt.launch.launcher", "launch_command"),
    "sample": ("scalegpt.launch.sample", "sample_command"),
    "eval": ("scalegpt.launch.evaluate", "eval_command"),
    "export": ("scalegpt.train.export", "export_command"),
    "plan": ("scalegpt.launch.plan", "plan_command"),
    "plot": ("scalegpt.launch.ladder.command", "plot_command"),  # a run or a ladder directory
    "inspect": ("scalegpt.launch.inspect_cmd", "inspect_command"),
    "curate": ("scalegpt.launch.curate", "curate_command"),
    "ladder": ("scalegpt.launch.ladder.command", "ladder_command"),
}


def _with_weights(sub: _Subparsers, name: str, help_: str) -> argparse.ArgumentParser:
    """A sub-command that reads trained weights."""
    s = sub.add_parser(name, help=help_)
    s.add_argument(
        "path", help="run, checkpoint or export directory, or a Hugging Face GPT-2 or GPT-Neo folder (config.json)"
    )
    return s


def _add_prepare(sub: _Subparsers) -> None:
    with_config(sub, "prepare", "tokenize every source of the config's data section")


def _add_curate(sub: _Subparsers) -> None:
    s = with_config(
        sub, "curate", "score and sign the curated sources' documents on a datatrove executor (local or SLURM)"
    )
    s.add_argument(
        "--executor", choices=("local", "slurm"), default="local", help="where the tasks run (default local)"
    )
    s.add_argument("--tasks", type=int, default=1, help="tasks that split each source's documents (default 1)")
    s.add_argument("--workers", type=int, default=-1, help="tasks at once (default -1: all)")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--time", default="24:00:00", help="SLURM time limit per task (default %(default)s)")
    s.add_argument("--cpus-per-task", type=int, default=1, help="SLURM CPUs per task (default 1)")
    s.add_argument("--mem-per-cpu-gb", type=int, default=2, help="SLURM memory per CPU in whole GB (default 2)")


def _add_train(sub: _Subparsers) -> None:
    s = with_config(sub, "train", "train in this process (one rank under a launcher)")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, then exit")


def _add_sample(sub: _Subparsers) -> None:
    s = _with_weights(sub, "sample", "sample text from a run, checkpoint or export")
    s.add_argument("--prompt", default=None, help="prompt text (default: read stdin if piped, else empty)")
    s.add_argument("--prompt-file", default=None, help="file of prompts, one per line")
    s.add_argument("--max-new-tokens", type=int, default=100)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    s.add_argument("--strict-context", action="store_true", help="error instead of cropping a long prompt")
    s.add_argument("--no-stream", action="store_true", help="print whole samples, not token by token")
    s.add_argument("--device", default="auto")


def _add_eval(sub: _Subparsers) -> None:
    s = _with_weights(sub, "eval", "few-shot and validation evaluation")
    s.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="built-in tasks: 2D+ 2D- 3D+ 3D- 2Dx, mc-2D+ ... mc-2Dx, cycle anagram1 anagram2 insert reverse, "
        "cycle-inverse reverse-inverse (default: all, or none when --lm-eval is given)",
    )
    s.add_argument("--shots", nargs="*", default=None, help="K values, integers or 'few' (default 0 1 few)")
    s.add_argument("--few-max", type=int, default=10, help="'few' = as many as fit in n_ctx, at most this")
    s.add_argument("--num-examples", type=int, default=100, help="queries per task (and lm-eval's limit)")
    s.add_argument("--seed", type=int, default=1234, help="seed of the generated problems and demonstrations")
    s.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    s.add_argument("--val-batches", type=int, default=50, help="validation batches per source (0 skips)")
    s.add_argument("--data-dir", default=None, help="prepared data for validation (default: the config's)")
    s.add_argument("--json", dest="json_out", default=None, help="write the results table here")
    s.add_argument("--wandb", action="store_true", help="log the config and result tables to wandb")
    s.add_argument(
        "--contamination", action="store_true", help="accuracy on clean and dirty queries (seen in the training text)"
    )
    s.add_argument("--lm-eval", nargs="+", default=None, metavar="TASK", help="lm-evaluation-harness tasks")
    s.add_argument("--lm-eval-include", default=None, metavar="DIR", help="folder of local lm-eval task YAMLs")
    s.add_argument("--device", default="auto")


def _add_export(sub: _Subparsers) -> None:
    s = _with_weights(sub, "export", "export weights to safetensors or Hugging Face format")
    s.add_argument("--format", choices=["safetensors", "hf"], required=True)
    s.add_argument("out_dir")


def _add_plan(sub: _Subparsers) -> None:
    s = sub.add_parser("plan", help="memory and throughput plan for a config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    s.add_argument("--tflops", type=float, default=400.0, help="sustained TFLOPS per GPU for step time")
    s.add_argument(
        "--compute", type=float, default=None, metavar="C", help="size a run for C FLOPs from --from's IsoFLOP fits"
    )
    s.add_argument("--from", dest="from_dir", default=None, metavar="LADDER_DIR", help="an IsoFLOP ladder directory")
    s.add_argument("--write", default=None, metavar="PATH", help="with --compute: write that run's config here")


def _add_plot(sub: _Subparsers) -> None:
    s = sub.add_parser("plot", help="PNG curves of a run")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    s.add_argument("--data-dir", default=None, help="prepared data for the epochs panel (default: the config's)")


def _add_inspect(sub: _Subparsers) -> None:
    s = sub.add_parser(
        "inspect",
        help="what steps A to B-1 of a run train on (samples per source, some decoded), or what curation dropped",
        description="Samples per source (count and share) of optimizer steps A to B-1 of the run as configured, "
        "through the trainer's own sampling; a run directory adds the sample ranges that run skipped.",
    )
    s.add_argument("config", help="run directory, run YAML, or a packaged preset by name")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.sources.0.weight=0.9")
    s.add_argument("--steps", default=None, help="A:B, steps A to B-1, numbered from 1 as in metrics.jsonl")
    s.add_argument(
        "--curation",
        action="store_true",
        help="instead of steps: what prepare's curation kept and dropped per source and step, and --show N "
        "dropped documents each (default 5) with the score or the kept copy that dropped them",
    )
    s.add_argument("--source", default=None, help="with --curation: only this source")
    s.add_argument("--json", dest="json_out", default=None, help="also write the report here")
    s.add_argument(
        "--show",
        type=int,
        default=None,
        help="decode N of those samples, spread over the steps (default 0); with --curation, N dropped documents "
        "per source and step (default 5)",
    )
    s.add_argument("--world-size", type=int, default=None, help="processes (default: the run's, else 1)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="scalegpt", description="Train, resume, sample and evaluate GPT-3-style models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    adders = (
        _add_prepare,
        _add_curate,
        _add_train,
        add_launch_parser,
        _add_sample,
        _add_eval,
        _add_export,
        _add_plan,
        _add_plot,
    )
    for add in (*adders, _add_inspect, add_ladder_parser):
        add(sub)
    return p


def _handler(command: str) -> Callable[[argparse.Namespace], int | None]:
    module_name, func = HANDLERS[command]
    return getattr(importlib.import_module(module_name), func)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """Launchers that pass `--local_rank=N` (DeepSpeed's, torch.distributed.launch) put it in LOCAL_RANK."""
    out = []
    for arg in argv:
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `scalegpt` command, not a call from Python
        # Registered first, so it runs last at exit: with torch, dynamo and DeepSpeed loaded, the
        # interpreter's final garbage collection takes 2-3 s per process; frozen objects are skipped.
        atexit.register(gc.freeze)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(_strip_local_rank(sys.argv[1:] if argv is None else argv))
        # key=value overrides may also come after options (`launch CFG --procs 2 model.n_layer=4`)
        unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
        code = _handler(args.command)(args)
        return int(code or 0)
    except UserError as exc:
        if isinstance(exc, SharedUserError) and os.environ.get("RANK", "0") != "0":
            return 2
        print(f"scalegpt: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if not os.environ.get(QUIET_INTERRUPT):
            print("scalegpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scalegpt sample ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
