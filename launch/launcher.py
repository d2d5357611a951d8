"""`scalegpt launch`: turn a config plus cluster arguments into a DeepSpeed, torchrun or SLURM launch.

We wrap the field's launchers, we do not replace them: every rank runs `python -m scalegpt train CONFIG
overrides...`, which reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from whichever
launcher set them (train.engine.adopt_launcher_env). The modes:

    --procs N      N CPU processes on this machine (DeepSpeed's launcher on its CPU accelerator)
    --gpus N       N GPUs on this machine (DeepSpeed's launcher; torchrun with --launcher torchrun)
    --hostfile F   every node of a DeepSpeed hostfile, through DeepSpeed's pdsh or openmpi runner
    --slurm        an sbatch script from templates/sbatch.sh, written to the run directory and submitted

Every mode checks the global batch against the world size before anything starts, and --dry-run prints
the exact command (or script) instead of running it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from ..train.config.loading import load_config
from ..train.config.schema import Config
from ..train.config.validation import global_batch
from ..train.errors import QUIET_INTERRUPT, UserError, check_writable_dir
from ..train.lifeline import launcher_mark
from ..train.osutil import atomic_write, free_port, port_taken
from ..train.rundir import SBATCH, check_free, check_same_experiment

Mode = Literal["procs", "gpus", "hostfile", "slurm"]
TEMPLATES = Path(__file__).with_name("templates")
SBATCH_TEMPLATE = TEMPLATES / "sbatch.sh"
SLURM_NODES, SLURM_GPUS_PER_NODE = 1, 8  # --slurm defaults when --nodes / --gpus-per-node are not given
# `HOSTNAME slots=N`, optionally followed by a comment: the subset of the MPI hostfile format that
# DeepSpeed's runner reads; anything else it would reject deep inside its own stack.
_HOST_LINE = re.compile(r"(?P<host>[^\s#]+)\s+slots=(?P<slots>\d+)\s*(?:#.*)?")


class ShellWord(str):
    """An argument that the generated script must leave to the shell (`"$MASTER_ADDR"`), not quote."""


@dataclass(frozen=True)
class Launch:
    """What `scalegpt launch` would run: a command with extra environment, or an sbatch script."""

    mode: Mode
    world_size: int
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    script: str | None = None

    def printable(self) -> str:
        """The command as one shell line (environment first), or the whole script."""
        if self.script is not None:
            return self.script
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, shlex.join(self.argv)])


# -- pieces ---------------------------------------------------------------------------------------------
def _train_args(config: str, overrides: list[str]) -> list[str]:
    """The module and arguments every rank runs, as `python -m scalegpt train CONFIG overrides...`."""
    return ["scalegpt", "train", config, *overrides]


def _executable(name: str) -> str:
    """The launcher installed beside this Python (the venv's), falling back to PATH. An absolute path,
    so the command also works on a node whose PATH lacks the venv (srun, pdsh)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Host -> slots from a DeepSpeed/MPI hostfile (`HOSTNAME slots=N`, `#` comments), or a UserError
    that names the line, before DeepSpeed's runner fails on it with a traceback."""
    p = Path(path)
    example = "one line per node, `HOSTNAME slots=GPUS`; see launch/templates/hostfile"
    if not p.is_file():
        raise UserError(f"hostfile {p} does not exist or is not a file; write {example}")
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read hostfile {p} ({exc}); write {example}") from exc
    hosts: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.fullmatch(line)
        if match is None:
            raise UserError(f"hostfile {p} line {number}: expected `HOSTNAME slots=N`, got {line!r}")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise UserError(f"hostfile {p} line {number}: {host} has slots={slots}; slots must be at least 1")
        if host in hosts:
            raise UserError(f"hostfile {p} line {number}: {host} is listed twice; list each node once")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"hostfile {p} lists no hosts; write {example}")
    return hosts


def _mode(args: argparse.Namespace) -> Mode:
    if args.slurm:
        return "slurm"
    if args.hostfile is not None:
        return "hostfile"
    if args.gpus is not None:
        return "gpus"
    if args.procs is not None:
        return "procs"
    raise UserError("say where to run: --procs N (CPU processes), --gpus N, --hostfile FILE or --slurm")


def _at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def _check_args(args: argparse.Namespace, mode: Mode, cfg: Config) -> None:
    """Flag combinations that would launch something other than what the user asked for."""
    _at_least_one(f"--{mode}", args.procs if mode == "procs" else args.gpus if mode == "gpus" else None)
    _at_least_one("--nodes", args.nodes)
    _at_least_one("--gpus-per-node", args.gpus_per_node)
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise UserError(f"--master-port must be a TCP port (1-65535), got {args.master_port}")
    if mode in ("procs", "gpus") and (args.nodes is not None or args.gpus_per_node is not None):
        raise UserError("--nodes and --gpus-per-node apply to --hostfile and --slurm, not to one machine")
    if mode == "procs" and cfg.train.device == "cuda":
        raise UserError("--procs starts CPU processes but train.device=cuda; use --gpus N for GPUs")
    if mode == "gpus" and cfg.train.device == "cpu":
        raise UserError(
            f"--gpus starts one rank per GPU but train.device=cpu (from {args.config} or an override); "
            "add train.device=cuda, or use --procs N for CPU processes"
        )
    if mode == "hostfile" and args.launcher == "torchrun":
        raise UserError(
            "--hostfile uses DeepSpeed's multi-node runners (--multinode-runner pdsh|openmpi); for torchrun "
            "on several nodes use --slurm, or start `torchrun --nnodes N --node-rank R` on each node"
        )
    if mode == "hostfile" and args.multinode_runner == "openmpi" and (args.nodes or args.gpus_per_node):
        raise UserError(
            "DeepSpeed's openmpi runner starts every slot of the hostfile; drop --nodes/--gpus-per-node and "
            "edit the hostfile's slots= instead, or use --multinode-runner pdsh"
        )


MULTI_NODE_PORT = 29500
"""The rendezvous port on the rank-0 node when --master-port is not given and the job spans nodes."""


def _cpu_env() -> dict[str, str]:
    """DeepSpeed picks its accelerator at import: name the CPU one, and hide GPUs from CPU ranks."""
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


# -- the modes --------------------------------------------------------------------------------------------
def _one_node(args: argparse.Namespace, mode: Mode, overrides: list[str]) -> Launch:
    n = args.procs if mode == "procs" else args.gpus
    env = _cpu_env() if mode == "procs" else {}
    port = str(args.master_port or free_port())
    if args.launcher == "torchrun":
        argv = [
            _executable("torchrun"),
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(n),
            "--master-addr",
            args.master_addr or "127.0.0.1",
            "--master-port",
            port,
            "-m",
            *_train_args(args.config, overrides),
        ]
    else:  # DeepSpeed's launcher always uses 127.0.0.1 on one node, so it takes no address
        argv = [
            _executable("deepspeed"),
            "--num_gpus",
            str(n),
            "--master_port",
            port,
            "--no_local_rank",
            "--module",
            *_train_args(args.config, overrides),
        ]
    return Launch(mode=mode, world_size=n, argv=argv, env=env)


def _hostfile(args: argparse.Namespace, cfg: Config, overrides: list[str]) -> Launch:
    hosts = parse_hostfile(args.hostfile)
    nodes = args.nodes or len(hosts)
    if nodes > len(hosts):
        raise UserError(f"--nodes {nodes} but hostfile {args.hostfile} lists only {len(hosts)} node(s)")
    chosen = list(hosts.items())[:nodes]  # DeepSpeed's --num_nodes takes the first N hosts
    world = sum(min(slots, args.gpus_per_node or slots) for _, slots in chosen)
    addr, port = args.master_addr or chosen[0][0], str(args.master_port or MULTI_NODE_PORT)
    argv = [
        _executable("deepspeed"),
        "--hostfile",
        str(Path(args.hostfile).resolve()),
        "--launcher",
        args.multinode_runner,
        "--master_addr",
        addr,
        "--master_port",
        port,
    ]
    if args.nodes:
        argv += ["--num_nodes", str(nodes)]
    if args.gpus_per_node:
        argv += ["--num_gpus", str(args.gpus_per_node)]
    if args.multinode_runner == "openmpi":
        # mpirun sets only OMPI_COMM_WORLD_*: the ranks need the rendezvous address from us
        argv += ["--launcher_args", f"-x MASTER_ADDR={addr} -x MASTER_PORT={port}"]
    argv += ["--no_local_rank", "--module", *_train_args(args.config, overrides)]
    env = _cpu_env() if cfg.train.device == "cpu" else {}
    return Launch(mode="hostfile", world_size=world, argv=argv, env=env)


def _directive_value(flag: str, value: str) -> str:
    """sbatch reads `#SBATCH` lines itself, without a shell: a value must be one plain word."""
    if not value or any(c.isspace() for c in value):
        raise UserError(f"{flag} {value!r} must be one word without spaces, for an #SBATCH line")
    return value


def _script_word(arg: str) -> str:
    return arg if isinstance(arg, ShellWord) else shlex.quote(arg)


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill `{{name}}` placeholders; a placeholder without a value is a bug in this module, so it raises."""

    def fill(match: re.Match[str]) -> str:
        return values[match[1]]

    return re.sub(r"\{\{(\w+)\}\}", fill, text)


def _slurm(args: argparse.Namespace, cfg: Config, overrides: list[str]) -> Launch:
    nodes = args.nodes or SLURM_NODES
    per_node = args.gpus_per_node or SLURM_GPUS_PER_NODE
    cpu = cfg.train.device == "cpu"
    run_dir = Path(cfg.run.dir).resolve()
    addr, port = ShellWord('"$MASTER_ADDR"'), ShellWord('"$MASTER_PORT"')
    if args.launcher == "torchrun":
        options: list[str] = [_executable("torchrun"), "--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
        options += ["--master-addr", addr, "--master-port", port]
        module = ["-m"]
    else:
        options = [_executable("deepspeed"), "--hostfile", ShellWord('"$HOSTFILE"'), "--no_ssh"]
        options += ["--master_addr", addr, "--master_port", port, "--no_local_rank"]
        module = ["--module"]
    lines = [options, [*module, *_train_args(args.config, overrides)]]
    optional = [f"#SBATCH --partition={_directive_value('--partition', args.partition)}"] if args.partition else []
    if args.account:
        optional.append(f"#SBATCH --account={_directive_value('--account', args.account)}")
    resources = "# train.device=cpu: CPU ranks, no GPUs requested" if cpu else f"#SBATCH --gpus-per-node={per_node}"
    job_name = re.sub(r"\s+", "-", cfg.run.name or run_dir.name) or "scalegpt"
    values = {
        "command": _rendering_command(args, nodes, per_node, overrides),
        "launcher": args.launcher,
        "ranks_per_node": str(per_node),
        "job_name": job_name,
        "nodes": str(nodes),
        "resources": resources,
        "time": _directive_value("--time", args.time),
        "output": _directive_value("run.dir", str(run_dir / "slurm-%j.out")),
        "optional_directives": "\n".join(optional),
        "workdir": shlex.quote(str(Path.cwd())),
        "exports": "".join(f"export {k}={shlex.quote(v)}  # CPU ranks\n" for k, v in _cpu_env().items()) if cpu else "",
        "master_port": str(args.master_port or MULTI_NODE_PORT),
        "run_dir": shlex.quote(str(run_dir)),
        "launcher_command": " \\\n    ".join(" ".join(_script_word(a) for a in line) for line in lines),
    }
    script = render_template(SBATCH_TEMPLATE.read_text(), values)
    return Launch(mode="slurm", world_size=nodes * per_node, script=script)


def _rendering_command(args: argparse.Namespace, nodes: int, per_node: int, overrides: list[str]) -> str:
    """The `scalegpt launch` line that made a script, for its header: a user can see how to remake it."""
    words = ["scalegpt", "launch", args.config, "--slurm", "--nodes", str(nodes), "--gpus-per-node", str(per_node)]
    words += [
        "--launcher",
        args.launcher,
        "--time",
        args.time,
        "--master-port",
        str(args.master_port or MULTI_NODE_PORT),
    ]
    for flag, value in (("--partition", args.partition), ("--account", args.account)):
        if value:
            words += [flag, value]
    return shlex.join([*words, *overrides]).replace("\n", " ")


def build_launch(args: argparse.Namespace, cfg: Config, overrides: list[str]) -> Launch:
    """What to run for these arguments; validates everything a launch could fail on, first."""
    mode = _mode(args)
    _check_args(args, mode, cfg)
    if mode in ("procs", "gpus"):
        launch = _one_node(args, mode, overrides)
    elif mode == "hostfile":
        launch = _hostfile(args, cfg, overrides)
    else:
        launch = _slurm(args, cfg, overrides)
    global_batch(cfg, launch.world_size)  # fail here, not in every rank, when the batch does not divide
    return launch


# -- running --------------------------------------------------------------------------------------------
def _check_run_dir(cfg: Config, *, free: bool) -> None:
    """A queued job should not wait hours to find that its run directory holds another experiment; with
    `free`, a job that starts now should not wait for its ranks to find another job holding it (its
    rank 0 takes the hold: see train/rundir.py)."""
    check_same_experiment(Path(cfg.run.dir), cfg)
    if free:
        check_free(Path(cfg.run.dir))


def submit(script: str, cfg: Config) -> int:
    """Write the script into the run directory (atomically, so a rerun never leaves half a script) and
    hand it to sbatch; print the job id."""

    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SBATCH
    atomic_write(path, script)
    path.chmod(0o755)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            f"sbatch is not installed here (not on PATH); the job script is written to {path}: "
            f"run `sbatch {path}` on a SLURM login node"
        )
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise UserError(f"sbatch refused {path}: {why}")
    job = done.stdout.strip().split(";")[0]  # --parsable prints `JOBID` or `JOBID;CLUSTER`
    print(f"scalegpt: submitted SLURM job {job}: script {path}, log {run_dir / f'slurm-{job}.out'}", flush=True)
    return 0


def _check_gpus(n: int) -> None:
    import torch

    visible = torch.cuda.device_count()
    if visible < n:
        fix = f"use --gpus {visible}" if visible else "run on a GPU machine, or use --procs N for CPU processes"
        raise UserError(f"--gpus {n} but this machine has {visible} visible CUDA GPU(s); {fix}")


def launch_command(args: argparse.Namespace) -> int:
    mode = _mode(args)
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if mode == "procs" and cfg.train.device == "auto":
        overrides.append("train.device=cpu")  # ranks must not pick up a GPU this machine happens to have
        cfg = load_config(args.config, overrides)
    launch = build_launch(args, cfg, overrides)
    if args.dry_run:
        print(launch.printable(), end="" if launch.script is not None else "\n", flush=True)
        if launch.script is not None:
            where = Path(cfg.run.dir).resolve() / SBATCH
            print(f"scalegpt: dry run: would write {where} and submit it with sbatch", file=sys.stderr)
        return 0
    if mode != "hostfile":  # on this machine (or, for SLURM, where the script goes); a hostfile's nodes may differ
        check_writable_dir(cfg.run.dir, "run.dir")  # here, not in every rank after minutes in a queue
        _check_run_dir(cfg, free=launch.script is None)  # a script may queue behind the job that holds it
    if launch.script is not None:
        return submit(launch.script, cfg)
    if mode == "gpus":
        _check_gpus(args.gpus)
    if mode in ("procs", "gpus") and args.master_port and port_taken(args.master_port):  # else a 12 s rendezvous error
        raise UserError(f"--master-port {args.master_port} is in use on this machine; pick another, or leave it out")
    return run(launch)


def run(launch: Launch) -> int:
    """Start the launcher and wait; SIGTERM/SIGUSR1 go to the ranks so they save before exiting.

    The launcher runs in its own process group, so the terminal's Ctrl-C reaches only this process:
    DeepSpeed's launcher, interrupted itself, prints a traceback per process. This one passes the
    interrupt to the ranks and waits for them, so none outlives the command."""
    print(f"scalegpt: launching: {launch.printable()}", file=sys.stderr, flush=True)
    env = {**os.environ, **launch.env, QUIET_INTERRUPT: "1", **launcher_mark()}  # the ranks die with this process
    proc = subprocess.Popen(launch.argv, env=env, process_group=0)
    try:
        return _wait(proc)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while waiting is the same request
        _interrupt(proc)
        raise


def _interrupt(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """Ctrl-C for the ranks (the launcher itself, when none runs here: pdsh). A rank blocked in a
    collective whose peer has already stopped never sees it, so what is left after `grace_s` is killed."""
    ranks = _rank_processes(proc.pid)
    for target in ranks or [psutil.Process(proc.pid)]:
        try:
            target.send_signal(signal.SIGINT)
        except psutil.Error:
            continue
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        for rank in _rank_processes(proc.pid):
            rank.kill()
        proc.kill()
        proc.wait()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""What a scheduler sends before it ends a job (SLURM: SIGUSR1 ahead of the time limit, SIGTERM at it); a
rank that receives one finishes its step, saves a checkpoint and exits 0."""


@contextmanager
def forward_stop_signals(deliver: Callable[[int], object]) -> Iterator[None]:
    """While the body runs, a stop signal to this process goes to `deliver(signum)` instead of stopping it:
    the process that waits on trainers (the launcher, the ladder) must outlive them and pass the request
    on, so they can save. The handlers that were there before come back afterwards."""
    previous = {sig: signal.signal(sig, lambda signum, _frame: deliver(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _to_ranks(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Hand a stop signal straight to the ranks: they finish the step, save and exit 0. (DeepSpeed's
    launcher, signalled itself, would exit 1 and kill ranks that take over 30 s to save.) One rank is
    enough, since the ranks agree on stopping; with no rank on this node (pdsh), SIGTERM goes to the
    launcher, which stops the remote ranks its own way."""
    ranks = _rank_processes(proc.pid)
    for rank in ranks:
        rank.send_signal(signum)
    if not ranks and signum == signal.SIGTERM and proc.poll() is None:
        proc.send_signal(signum)
    elif not ranks:
        print(f"scalegpt: no rank runs on this node to receive signal {signum}", file=sys.stderr, flush=True)


def _wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the launcher, handing stop signals to the ranks meanwhile."""
    with forward_stop_signals(lambda signum: _to_ranks(proc, signum)):
        return proc.wait()


def _is_rank(cmdline: list[str]) -> bool:
    """A Python process running `-m scalegpt train`; not pdsh or mpirun, whose arguments carry the same words."""
    if not cmdline or not Path(cmdline[0]).name.startswith("python"):
        return False
    return any(cmdline[i : i + 3] == ["-m", "scalegpt", "train"] for i in range(len(cmdline) - 2))


def _rank_processes(launcher_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for child in children:
        try:
            if _is_rank(child.cmdline()):
                ranks.append(child)
        except psutil.Error:
            continue
    return ranks
