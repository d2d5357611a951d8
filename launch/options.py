"""Command-line pieces that more than one command reads: the parser whose errors follow the one-line
contract, and `scalegpt launch`'s options, which the ladder's --launch reads with the same meanings.
launch/cli.py builds every command's parser from these on each start, so this module imports argparse
only."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..train.errors import UserError

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors follow the same one-line contract
        raise UserError(f"{message} (see `{self.prog} --help`)")


def with_config(sub: _Subparsers, name: str, help_: str) -> argparse.ArgumentParser:
    """A sub-command that reads a run YAML and key=value overrides."""
    s = sub.add_parser(name, help=help_, description=help_)
    s.add_argument("config", help="run YAML, or a packaged preset by name: configs/smoke.yaml, smoke, gpt3-small")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=4")
    return s


def add_launch_parser(sub: _Subparsers) -> None:
    s = with_config(sub, "launch", "start a multi-process / multi-GPU / multi-node run")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--procs", type=int, help="N CPU processes on this machine")
    where.add_argument("--gpus", type=int, help="N GPUs on this machine")
    where.add_argument("--hostfile", help="DeepSpeed hostfile for several nodes")
    where.add_argument("--slurm", action="store_true", help="write and submit an sbatch script")
    s.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    s.add_argument("--nodes", type=int, default=None, help="nodes (SLURM: default 1; hostfile: default all)")
    s.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="ranks per node: GPUs, or CPU processes when train.device=cpu (SLURM: default 8; hostfile: slots)",
    )
    s.add_argument("--master-addr", default=None, help="address of the rank-0 node (hostfile: default its first host)")
    s.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port (one machine: default a free one, so two jobs can share it; nodes: 29500)",
    )
    s.add_argument(
        "--multinode-runner", choices=["pdsh", "openmpi"], default="pdsh", help="DeepSpeed's runner (hostfile)"
    )
    s.add_argument("--time", default="24:00:00", help="SLURM time limit")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
