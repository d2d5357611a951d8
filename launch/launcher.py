"""`scalegpt launch`: turn a config plus cluster arguments into a DeepSpeed or torchrun command line.

We wrap the field's launchers, we do not replace them: each rank runs `python -m scalegpt train`,
which reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from whichever launcher set them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..train.config import Config, load_config
from ..train.engine import global_batch
from ..train.errors import UserError


def _rank_command(args: argparse.Namespace) -> list[str]:
    return ["-m", "scalegpt", "train", str(args.config), *args.overrides]


def _executable(name: str) -> str:
    """The launcher installed beside this Python (the venv's), falling back to PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def build_command(args: argparse.Namespace, cfg: Config) -> tuple[list[str], dict[str, str]]:
    """The command (argv) and extra environment for a single-node launch of N ranks."""
    n = args.procs or args.gpus or 1
    if n < 1:
        raise UserError(f"--procs/--gpus must be at least 1, got {n}")
    global_batch(cfg, n)  # fail now, not in every rank, when the batch does not divide
    env: dict[str, str] = {}
    if args.procs:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
        if cfg.train.device == "auto":
            args.overrides = [*args.overrides, "train.device=cpu"]
    port = str(args.master_port)
    if args.launcher == "torchrun":
        cmd = [_executable("torchrun"), "--nnodes", "1", "--nproc-per-node", str(n), "--master-addr",
               args.master_addr or "127.0.0.1", "--master-port", port, *_rank_command(args)]
    else:
        cmd = [_executable("deepspeed"), "--num_gpus", str(n), "--master_port", port, "--module",
               "scalegpt", "train", str(args.config), *args.overrides]
    return cmd, env


def launch_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cmd, env = build_command(args, cfg)
    printable = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd)
    if args.dry_run:
        print(printable.strip())
        return 0
    print(f"scalegpt: launching: {printable.strip()}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env})
    return proc.returncode
