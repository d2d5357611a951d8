"""DeepSpeed wiring: the one module that imports deepspeed for training.

The DeepSpeed JSON is generated from Config (one source of truth); the `deepspeed:` section may add
keys but never contradict one we set. ZeRO partitioning, mixed precision, gradient accumulation and
clipping are all DeepSpeed's; we hand-write none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model import GPT
from ..model.flops import count_params
from .config import Config, global_batch
from .errors import UserError
from .osutil import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    return cfg.train.device


def adopt_launcher_env() -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE from Open MPI's variables under mpirun or SLURM's under srun, or make
    a one-process group when no launcher set anything, so `scalegpt train` runs alone as well as one rank of many."""
    env = os.environ
    if "RANK" not in env and "OMPI_COMM_WORLD_RANK" in env:  # mpirun (DeepSpeed's openmpi runner)
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for `rank` (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and never removes it, so every job on
    a new port leaves them behind until memory runs out (270 of them, 18 GB, took down this machine). Once
    every rank has mapped every file, which init_distributed has done on all ranks by the barrier, the
    names can go: the mappings stay valid until the processes exit, and nothing outlives them."""
    torch.distributed.barrier()
    with contextlib.suppress(FileNotFoundError):  # a multi-node run, which does not use the shm path
        shm_buffer_path(rank).unlink()


def init_distributed(cfg: Config) -> DistEnv:
    """Join (or create) the process group: gloo on CPU, nccl on GPU."""
    device = resolve_device(cfg)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    adopt_launcher_env()
    import deepspeed

    rank, local_rank, world = (
        int(os.environ["RANK"]),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ["WORLD_SIZE"]),
    )
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False)
    if device == "cpu":
        release_shm_buffer(rank)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices (Linear weights and embeddings). Biases and LayerNorm gains are 1-D: decaying
    them pulls gains towards 0 instead of 1 and offsets towards 0, constraining nothing useful."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(cfg: Config, *, world_size: int, device: str, accumulation: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON, derived from Config, with the `deepspeed:` pass-through merged last."""
    t, o = cfg.train, cfg.optim
    gas = accumulation or global_batch(cfg, world_size) // (t.micro_batch * world_size)
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        zero.update(overlap_comm=t.overlap_comm, contiguous_gradients=t.contiguous_gradients)
    if t.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    adam: dict[str, Any] = {
        "lr": o.lr,
        "betas": [o.beta1, o.beta2],
        "eps": o.eps,
        "weight_decay": o.weight_decay,
    }
    if device == "cpu" and not t.cpu_offload:
        adam["torch_adam"] = True  # DeepSpeed's FusedAdam needs CUDA; torch's AdamW is the CPU path
        # torch's fused CPU kernel: one pass over each flat ZeRO partition instead of a dozen whole-tensor
        # ops; gpt3-small's CPU step drops from 4.5 to 3.0 s (bench/RESULTS.md)
        adam["fused"] = True
    ds: dict[str, Any] = {
        "train_batch_size": t.micro_batch * gas * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    ds = merge_passthrough(ds, dict(cfg.deepspeed))
    if t.zero_stage in (1, 2):
        # DeepSpeed's default buckets hold 5e8 elements each whatever the model; a bucket larger than the
        # model only costs memory (3.7 GB of empty fp32 buffers for the smoke model), so cap it there.
        # A tuning knob, not a Config value: the pass-through may set it.
        bucket = int(min(5e8, count_params(cfg.model)))
        ds["zero_optimization"].setdefault("reduce_bucket_size", bucket)
        ds["zero_optimization"].setdefault("allgather_bucket_size", bucket)
    return ds


def merge_passthrough(ours: dict[str, Any], extra: dict[str, Any], prefix: str = "deepspeed") -> dict[str, Any]:
    """Add the user's keys; a key we already set to a different value is an error naming it."""
    out = dict(ours)
    for key, value in extra.items():
        path = f"{prefix}.{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_passthrough(out[key], value, path)
        elif out[key] != value:
            raise UserError(
                f"{path}={json.dumps(value)} contradicts the value {json.dumps(out[key])} derived from the config; "
                "set it through the config section instead (train.*, optim.*), or remove it"
            )
    return out


def build_engine(cfg: Config, model: GPT, env: DistEnv, *, load_universal: bool = False) -> Any:
    """deepspeed.initialize with our generated config; activation checkpointing and compile applied
    from outside the model."""
    import deepspeed

    ds = deepspeed_config(cfg, world_size=env.world_size, device=env.device.type)
    if load_universal:
        ds["checkpoint"]["load_universal"] = True
    model.activation_checkpointing = cfg.train.activation_checkpointing
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds
    )
    if cfg.train.compile:
        engine.compile()
    return engine
