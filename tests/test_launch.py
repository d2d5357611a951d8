"""`scalegpt launch`: every mode's dry run is a command that would run; bad hostfiles and GPU counts are one-line
errors; the rank environment of each launcher is understood; and, slow, two torchrun "nodes" on 127.0.0.1 and
the rendered SLURM script (run with stand-in srun/scontrol) train exactly like two local processes."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from scalegpt.launch.cli import main
from scalegpt.launch.launcher import _is_rank, parse_hostfile
from scalegpt.train.checkpoint import LATEST, checkpoint_dir
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import to_yaml
from scalegpt.train.engine import adopt_launcher_env
from scalegpt.train.errors import UserError

from conftest import ROOT
from e2e import SMALL_DATA, SMOKE, free_port, latest_step, losses, metrics, scalegpt
from helpers import one_error_line

BIN = Path(sys.executable).parent
SIX_STEPS = ["train.max_steps=6", "log.every=1", "eval.every=0"]
# Equal thread counts make the two launchers' runs bitwise equal (torchrun and DeepSpeed's launcher
# advertise different local world sizes, from which a rank would otherwise pick its thread count).
CPU_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`scalegpt launch SMOKE ARGS` in this process (the dry runs need no subprocess): code, stdout, stderr."""
    code = main(["launch", SMOKE, *args])
    out, err = capsys.readouterr()
    return code, out, err


def dry_run_argv(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict[str, str], list[str]]:
    code, out, err = launch(capsys, *args, "--dry-run")
    assert code == 0, err
    words = shlex.split(out)
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert os.access(words[0], os.X_OK), f"{words[0]} is not an executable"
    return env, words


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def rank_command(argv: list[str], module_flag: str) -> list[str]:
    """What each rank runs, after the launcher's module flag: `scalegpt train CONFIG overrides...`."""
    return argv[argv.index(module_flag) + 1 :]


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nworker-0 slots=2\n\nworker-1 slots=2   # trailing comment\n")
    return path


# -- dry runs ---------------------------------------------------------------------------------------------
def test_procs_dry_run_is_a_deepspeed_command_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    env, argv = dry_run_argv(capsys, "--procs", "2", "--master-port", "29612", "run.dir=runs/x", "model.n_layer=1")
    assert env == {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    assert Path(argv[0]).name == "deepspeed"
    assert option(argv, "--num_gpus") == "2" and option(argv, "--master_port") == "29612"
    assert "--no_local_rank" in argv
    assert rank_command(argv, "--module") == ["scalegpt", "train", SMOKE, "run.dir=runs/x", "model.n_layer=1"]


def test_one_machine_picks_a_free_port_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    """Two jobs launched on one machine without --master-port must not both try 29500."""
    import socket

    ports = []
    for launcher, flag in (("deepspeed", "--master_port"), ("torchrun", "--master-port")):
        _, argv = dry_run_argv(capsys, "--procs", "2", "--launcher", launcher)
        ports.append(int(option(argv, flag)))
        with socket.socket() as s:
            s.bind(("127.0.0.1", ports[-1]))  # free now: nothing listens there
    assert all(1024 <= p <= 65535 for p in ports)


def test_the_launcher_imports_neither_torch_nor_deepspeed() -> None:
    """`scalegpt launch` only reads the config and starts DeepSpeed's launcher: importing torch (3-4 s here)
    would only delay every job, and every rank pays for its own import anyway."""
    code = "import sys; from scalegpt.launch import launcher; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_gpus_dry_run(capsys: pytest.CaptureFixture[str], launcher: str) -> None:
    env, argv = dry_run_argv(
        capsys, "--gpus", "2", "--launcher", launcher, "--master-port", "29613", "train.device=cuda"
    )
    assert env == {}
    assert Path(argv[0]).name == launcher
    if launcher == "deepspeed":
        assert option(argv, "--num_gpus") == "2" and option(argv, "--master_port") == "29613"
        assert rank_command(argv, "--module") == ["scalegpt", "train", SMOKE, "train.device=cuda"]
    else:
        assert option(argv, "--nnodes") == "1" and option(argv, "--nproc-per-node") == "2"
        assert option(argv, "--master-addr") == "127.0.0.1" and option(argv, "--master-port") == "29613"
        assert rank_command(argv, "-m") == ["scalegpt", "train", SMOKE, "train.device=cuda"]


def test_hostfile_dry_run_pdsh(capsys: pytest.CaptureFixture[str], hostfile: Path) -> None:
    env, argv = dry_run_argv(capsys, "--hostfile", str(hostfile), "train.device=cuda", "train.global_batch=32")
    assert env == {} and Path(argv[0]).name == "deepspeed"
    assert option(argv, "--hostfile") == str(hostfile.resolve()) and option(argv, "--launcher") == "pdsh"
    # the first host is the rendezvous unless --master-addr says otherwise
    assert option(argv, "--master_addr") == "worker-0" and option(argv, "--master_port") == "29500"
    assert "--num_nodes" not in argv and "--num_gpus" not in argv  # every slot of every host: 4 ranks
    assert rank_command(argv, "--module") == ["scalegpt", "train", SMOKE, "train.device=cuda", "train.global_batch=32"]

    # 4 ranks x micro batch 8 do not divide the smoke config's global batch of 16: caught before launching
    code, _, err = launch(capsys, "--hostfile", str(hostfile), "train.device=cuda", "--dry-run")
    assert code == 2 and "world size 4" in one_error_line(err)

    _, argv = dry_run_argv(
        capsys, "--hostfile", str(hostfile), "--nodes", "1", "--gpus-per-node", "1", "--master-addr", "10.1.2.3",
        "train.device=cuda",
    )  # fmt: skip
    assert option(argv, "--num_nodes") == "1" and option(argv, "--num_gpus") == "1"
    assert option(argv, "--master_addr") == "10.1.2.3"


def test_hostfile_dry_run_openmpi(capsys: pytest.CaptureFixture[str], hostfile: Path) -> None:
    _, argv = dry_run_argv(
        capsys, "--hostfile", str(hostfile), "--multinode-runner", "openmpi", "--master-port", "29614",
        "train.device=cuda", "train.global_batch=32",
    )  # fmt: skip
    assert option(argv, "--launcher") == "openmpi" and option(argv, "--master_port") == "29614"
    # mpirun does not pass the rendezvous on by itself: it is exported to every rank with -x
    assert shlex.split(option(argv, "--launcher_args")) == [
        "-x",
        "MASTER_ADDR=worker-0",
        "-x",
        "MASTER_PORT=29614",
    ]
    assert rank_command(argv, "--module")[:3] == ["scalegpt", "train", SMOKE]
    code, _, err = launch(capsys, "--hostfile", str(hostfile), "--multinode-runner", "openmpi", "--nodes", "1")
    assert code == 2 and "openmpi" in one_error_line(err)


def srun_launcher_argv(script: str) -> list[str]:
    """The node launcher's argv in the script's srun command (shell variables left as `$NAME`)."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    return words[words.index("bash") + 3 :]  # after `bash -c 'WRAPPER'`


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_slurm_dry_run_renders_a_valid_script(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, launcher: str
) -> None:
    run_dir = tmp_path / "run"
    code, script, err = launch(
        capsys, "--slurm", "--nodes", "2", "--gpus-per-node", "4", "--launcher", launcher, "--time", "2:00:00",
        "--partition", "gpu", "--account", "proj1", "--master-port", "29615", "--dry-run",
        f"run.dir={run_dir}", "train.device=cuda", "train.global_batch=64", "run.name=a b",
    )  # fmt: skip
    assert code == 0, err
    assert not run_dir.exists()  # a dry run writes nothing
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--time=2:00:00",
        "--partition=gpu",
        "--account=proj1",
        "--job-name=a-b",
        f"--output={run_dir}/slurm-%j.out",
        "--signal=USR1@180",
    ):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "\nMASTER_PORT=29615\n" in script and "scontrol show hostnames" in script
    assert "NCCL_DEBUG" in script and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script and "NCCL_IB_DISABLE" in script
    argv = srun_launcher_argv(script)
    assert Path(argv[0]).name == launcher and os.access(argv[0], os.X_OK)
    overrides = [f"run.dir={run_dir}", "train.device=cuda", "train.global_batch=64", "run.name=a b"]
    if launcher == "torchrun":
        assert option(argv, "--nnodes") == "2" and option(argv, "--nproc-per-node") == "4"
        assert option(argv, "--master-addr") == "$MASTER_ADDR" and option(argv, "--master-port") == "$MASTER_PORT"
        assert rank_command(argv, "-m") == ["scalegpt", "train", SMOKE, *overrides]
    else:
        assert option(argv, "--hostfile") == "$HOSTFILE" and "--no_ssh" in argv
        assert option(argv, "--master_addr") == "$MASTER_ADDR" and option(argv, "--master_port") == "$MASTER_PORT"
        assert rank_command(argv, "--module") == ["scalegpt", "train", SMOKE, *overrides]
    # 2 nodes x 4 GPUs x micro batch 8 do not divide a global batch of 16
    code, _, err = launch(capsys, "--slurm", "--nodes", "2", "--gpus-per-node", "4", "train.device=cuda", "--dry-run")
    assert code == 2 and "world size 8" in one_error_line(err)


def fake_sbatch(bin_dir: Path) -> Path:
    """An `sbatch` that records its arguments and answers like `sbatch --parsable`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" >"${0%/*}/sbatch.args"\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir / "sbatch.args"


def test_slurm_writes_the_script_into_the_run_dir_and_submits_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    args = ("--slurm", "--nodes", "2", "--gpus-per-node", "2", f"run.dir={run_dir}", "train.device=cuda")
    _, dry, _ = launch(capsys, *args, "train.global_batch=32", "--dry-run")

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch here
    code, _, err = launch(capsys, *args, "train.global_batch=32")
    assert code == 2
    line = one_error_line(err)
    assert "sbatch is not installed" in line and str(run_dir / "sbatch.sh") in line
    assert (run_dir / "sbatch.sh").read_text() == dry  # the script is kept, for the user to submit elsewhere

    recorded = fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.defpath}")
    code, out, err = launch(capsys, *args, "train.global_batch=32")
    assert code == 0, err
    assert "submitted SLURM job 4242" in out and str(run_dir / "sbatch.sh") in out
    assert recorded.read_text().split() == ["--parsable", str(run_dir / "sbatch.sh")]
    assert (run_dir / "sbatch.sh").read_text() == dry
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_slurm_refuses_a_run_dir_of_another_experiment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found before submitting, not after the job has waited in the queue."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config(SMOKE, [f"run.dir={run_dir}", "optim.lr=1e-4"])))
    recorded = fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.defpath}")
    code, _, err = launch(capsys, "--slurm", "--gpus-per-node", "2", f"run.dir={run_dir}", "train.device=cuda")
    assert code == 2 and "optim.lr" in one_error_line(err)
    assert not (run_dir / "sbatch.sh").exists() and not recorded.exists()


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "does not exist"),
        ("worker-0 8\n", "line 1: expected `HOSTNAME slots=N`"),
        ("# a\nworker-0 slots=two\n", "line 2: expected"),
        ("worker-0 slots=0\n", "slots must be at least 1"),
        ("worker-0 slots=2\nworker-0 slots=2\n", "listed twice"),
        ("# nothing but comments\n\n", "lists no hosts"),
    ],
)
def test_bad_hostfile_is_one_error_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "hosts"
    if text is not None:
        path.write_text(text)
    code, out, err = launch(capsys, "--hostfile", str(path), "train.device=cuda", "--dry-run")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert message in line and str(path) in line


def test_bad_hostfile_through_the_real_command(tmp_path: Path) -> None:
    """The installed entry point, in a subprocess: exit 2, one line, no traceback."""
    (tmp_path / "hosts").write_text("worker-0 slots=2 extra\n")
    proc = scalegpt("launch", SMOKE, "--hostfile", str(tmp_path / "hosts"), "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "line 1: expected `HOSTNAME slots=N`" in one_error_line(proc.stderr.replace("\r", ""))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--gpus", "-2"], "--gpus must be at least 1"),
        (["--gpus", "3"], "not divisible"),  # 3 x micro batch 8 does not divide 16
        (["--gpus", "64", "train.global_batch=512"], "CUDA GPU"),  # more than this machine has
        (["--gpus", "2", "train.device=cpu"], "train.device=cpu"),
        (["--procs", "0"], "--procs must be at least 1"),
        (["--procs", "2", "--nodes", "2"], "--nodes and --gpus-per-node apply to"),
        (["--gpus", "2", "--master-port", "70000"], "--master-port"),
        ([], "say where to run"),
    ],
)
def test_bad_gpus_and_flags_are_one_error_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    device = [] if any(a.startswith("train.device") for a in args) else ["train.device=auto"]
    # a run.dir of its own: the preset's runs/smoke may hold a user's `make setup` run, which is refused first
    code, _, err = launch(capsys, *args, *device, f"run.dir={tmp_path / 'run'}")
    assert code == 2
    assert message in one_error_line(err)


def test_hostfile_parser_reads_what_deepspeed_reads(hostfile: Path) -> None:
    assert parse_hostfile(hostfile) == {"worker-0": 2, "worker-1": 2}
    example = ROOT / "launch" / "templates" / "hostfile"
    assert parse_hostfile(example) == {"worker-0": 8, "worker-1": 8}
    with pytest.raises(UserError):
        parse_hostfile(hostfile.parent)  # a directory


# -- the environment each launcher sets ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # torchrun and DeepSpeed's launcher set the variables themselves: kept as they are
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n0", "MASTER_PORT": "7"}, ("3", "1", "4")),
        # srun running the ranks directly
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, ("5", "1", "8")),
        # mpirun (DeepSpeed's openmpi runner)
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"},
            ("2", "0", "4"),
        ),
        # a launcher's variables win over the SLURM allocation it runs in
        (
            {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
            ("1", "1", "2"),
        ),
        # nothing: one process
        ({}, ("0", "0", "1")),
    ],
)
def test_adopt_launcher_env(
    monkeypatch: pytest.MonkeyPatch, given: dict[str, str], expected: tuple[str, str, str]
) -> None:
    monkeypatch.setattr(os, "environ", dict(given))  # exactly these variables, and none of this process's
    adopt_launcher_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == expected
    assert os.environ["MASTER_ADDR"] and os.environ["MASTER_PORT"]


def test_signals_go_to_ranks_not_to_remote_launchers() -> None:
    assert _is_rank([sys.executable, "-u", "-m", "scalegpt", "train", "c.yaml"])
    assert not _is_rank(
        ["pdsh", "-w", "a,b", "python", "-u", "-m", "deepspeed.launcher.launch", "--module", "scalegpt"]
    )
    assert not _is_rank(["mpirun", "-n", "2", "python", "-u", "-m", "scalegpt", "train", "c.yaml"])


# -- end to end ------------------------------------------------------------------------------------------
def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "OMPI_"))}
    return {**env, **CPU_ENV, **extra}


def _wait_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Wait for every process; if one fails or time runs out, stop the rest instead of hanging on them."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    return [p.communicate()[0] for p in procs]


@pytest.fixture(scope="module")
def two_local_procs(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: `scalegpt launch --procs 2` on one node, six steps."""
    run = tmp_path_factory.mktemp("two_local") / "run"
    scalegpt(
        "launch", SMOKE, "--procs", "2", "--master-port", str(free_port()), f"run.dir={run}", f"data.dir={prepared}",
        *SMALL_DATA, *SIX_STEPS, env=CPU_ENV,
    )  # fmt: skip
    return run


@pytest.mark.slow
def test_two_torchrun_nodes_on_one_machine_equal_two_local_processes(
    prepared: Path, two_local_procs: Path, tmp_path: Path
) -> None:
    """Two torchrun agents with --nnodes 2 on 127.0.0.1, one CPU rank each. Each agent runs in its own
    directory with the relative run.dir `run`, so what rank 1 writes is visible apart from rank 0's: its
    own checkpoint shard, and never config.yaml, metrics.jsonl or `latest`."""
    port = str(free_port())
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    agents = []
    for rank, node in enumerate(nodes):
        node.mkdir()
        cmd = [
            str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
            "--master-addr", "127.0.0.1", "--master-port", port,
            "-m", "scalegpt", "train", SMOKE, "train.device=cpu", "run.dir=run", f"data.dir={prepared}",
            *SMALL_DATA, *SIX_STEPS,
        ]  # fmt: skip
        agents.append(
            subprocess.Popen(
                cmd, cwd=node, env=_clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = _wait_all(agents, timeout=300)
    for agent, out in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, out[-4000:]

    rank0, rank1 = nodes[0] / "run", nodes[1] / "run"
    assert losses(rank0) == losses(two_local_procs)  # bit for bit
    assert sorted(losses(rank0)) == list(range(1, 7))
    assert {m["world_size"] for m in metrics(rank0)} == {2}
    assert {"config.yaml", "metrics.jsonl", "tokenizer.json"} <= {p.name for p in rank0.iterdir()}
    assert latest_step(rank0) == 6

    written = sorted(str(p.relative_to(rank1)) for p in rank1.rglob("*") if p.is_file())
    assert written, "rank 1 wrote no checkpoint shard: the test did not see rank 1's directory"
    shard_dir = checkpoint_dir(Path(), 6)  # relative to the run directory: checkpoints/<tag>
    assert all(name.startswith(f"{shard_dir}/") for name in written), written
    assert not [n for n in written if n.endswith(("config.yaml", "metrics.jsonl", "tokenizer.json", LATEST))]
    assert f"{shard_dir}/zero_pp_rank_1_mp_rank_00_optim_states.pt" in written
    assert "step 6/6" in outputs[0] and "step 6/6" not in outputs[1]  # only rank 0 prints progress


def stand_in_slurm(bin_dir: Path) -> Path:
    """`scontrol` and `srun` for one machine: two "nodes" (two names for this host), and srun starting its
    command once per node with that node's SLURM_NODEID, as the real one does on each node."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'localhost\\n127.0.0.1\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == -* ]]; do shift; done\n"
        "pids=()\n"
        'for node in 0 1; do SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" & pids+=($!); done\n'
        "rc=0\n"
        'for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done\n'
        "exit $rc\n"
    )
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_the_sbatch_script_trains_and_stops_on_slurms_usr1(
    prepared: Path, two_local_procs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rendered script itself, with DeepSpeed's launcher in --no_ssh mode on each of two "nodes". Once it
    trains, every process of the step gets SIGUSR1, as SLURM sends it before the time limit: the node
    launchers must survive it, and the ranks save and exit 0, so the job ends cleanly."""
    run = tmp_path / "run"
    code, script, err = launch(
        capsys, "--slurm", "--nodes", "2", "--gpus-per-node", "1", "--master-port", str(free_port()), "--dry-run",
        f"run.dir={run}", f"data.dir={prepared}", *SMALL_DATA, "train.max_steps=100000", "log.every=1",
        "eval.every=0",
    )  # fmt: skip
    assert code == 0, err
    (tmp_path / "job.sh").write_text(script)
    slurm = stand_in_slurm(tmp_path / "bin")
    env = _clean_env(
        PATH=f"{slurm}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="localhost,127.0.0.1",
        SLURM_CPUS_ON_NODE="1",
    )
    log = tmp_path / "job.log"
    with log.open("w") as out:
        job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=env, stdout=out, stderr=out)
    step_processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        (srun,) = psutil.Process(job.pid).children()
        step_processes = srun.children(recursive=True)  # the tasks: launchers and ranks, not srun itself
        assert sum(_is_rank(p.cmdline()) for p in step_processes) == 2
        for process in step_processes:
            process.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:  # nothing outlives a failed test, not even a rank whose launcher died
        if job.poll() is None:
            step_processes += psutil.Process(job.pid).children(recursive=True)
            job.kill()
        for process in step_processes:
            with contextlib.suppress(psutil.Error):  # gone already
                process.kill()
    assert "received a stop signal" in log.read_text()
    assert (run / "hostfile.77").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    got, want = losses(run), losses(two_local_procs)
    assert len(got) >= 3 and {s: got[s] for s in got if s in want} == {s: want[s] for s in got if s in want}
    assert latest_step(run) == max(got)  # saved the step it stopped at
    assert {m["world_size"] for m in metrics(run)} == {2}
