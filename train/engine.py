"""DeepSpeed wiring: the one module that imports deepspeed for training.

The DeepSpeed JSON is generated from Config (one source of truth); the `deepspeed:` section may add
keys but never contradict one we set. ZeRO partitioning, mixed precision, gradient accumulation and
clipping are all DeepSpeed's; we hand-write none of them. ``engine_step`` drives the engine through one
optimizer step, and ``broadcast_object`` and ``on_main`` are how ranks agree on what rank 0 decided.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..model import GPT
from ..model.flops import count_params
from .config.schema import Config
from .config.validation import global_batch
from .errors import SharedUserError, UserError
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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank, so an error found on rank 0 stops every rank instead of a hang."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(env: DistEnv, work: Callable[[], Any]) -> Any:
    """Rank 0 does `work` (its result is rank 0's alone); every rank waits for it and raises its error, so
    all agree before going on."""
    error, result = None, None
    if env.is_main:
        try:
            result = work()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise SharedUserError(error)
    return result


def pick_device(name: str, *, key: str = "--device", present: bool = True) -> torch.device:
    """The one place a device name becomes a torch.device: 'auto' is cuda when a GPU is visible, else cpu.

    An unknown name, or a GPU asked for on a machine without one, is a UserError naming `key` (the option
    or config key the user set). `present=False` skips the second check: a dry run describes a GPU job from
    a machine that has none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"unknown device {name!r} for {key}; use auto, cpu, cuda or cuda:N") from exc
    if present and dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name}, but this machine has no CUDA GPU; use {key}=cpu or {key}=auto")
    return dev


def resolve_device(cfg: Config, *, present: bool = True) -> str:
    """'cpu' or 'cuda' for train.device; which GPU is the launcher's choice (LOCAL_RANK)."""
    return pick_device(cfg.train.device, key="train.device", present=present).type


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


def skip_shm_comm_build() -> None:
    """Keep deepspeed.init_distributed from JIT-compiling its shared-memory op with gcc on CPU.

    The op (deepspeed_shm_comm) serves only DeepSpeed's inference all-reduce; the all-reduce ZeRO calls is
    plain torch.distributed (gloo here). DeepSpeed builds it only when its table of compatible ops says
    so (comm/torch.py, build_shm_op), and that table is one dict cached in deepspeed.ops, so marking
    the op incompatible there skips the build, its /dev/shm buffers, and the compiler."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def compiled_ops_note(cfg: Config) -> str | None:
    """What the config needs compiled at start-up, or None: the default path compiles nothing."""
    if not cfg.train.cpu_offload:
        return None
    return (
        "train.cpu_offload=true steps the optimizer with DeepSpeed's CPU Adam, which DeepSpeed compiles at "
        "start-up with the host C++ compiler (c++, or $CXX) and ninja, unless it was installed prebuilt "
        "(DS_BUILD_CPU_ADAM=1 pip install deepspeed)"
    )


def check_build_tools(cfg: Config) -> None:
    """A one-line error, before any work, when the config needs a compiled op this machine cannot build."""
    note = compiled_ops_note(cfg)
    if note is None:
        return
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam", False):
        return
    missing = [tool for tool in (os.environ.get("CXX", "c++"), "ninja") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"{note}; this machine has no {' or '.join(missing)}: install them (apt-get install g++; "
            "pip install ninja) or set train.cpu_offload=false"
        )


def init_distributed(cfg: Config) -> DistEnv:
    """Join (or create) the process group: gloo on CPU, nccl on GPU. Nothing is compiled here."""
    device = resolve_device(cfg)
    if device == "cpu" and cfg.train.precision == "fp16":
        raise UserError("train.precision=fp16 needs a GPU (its loss scaling is CUDA-only); on CPU use fp32 or bf16")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    adopt_launcher_env()
    check_build_tools(cfg)
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
    else:
        skip_shm_comm_build()  # the CUDA accelerator has no such op to build
    deepspeed.init_distributed(**dist_kwargs(cfg, device))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def dist_kwargs(cfg: Config, device: str) -> dict[str, Any]:
    """deepspeed.init_distributed's arguments. The time-out bounds every collective, and a rank that waits
    at a barrier while rank 0 alone converts or writes a big checkpoint waits under it too; DeepSpeed's
    default of 10 minutes is too short for that on big models."""
    return {
        "dist_backend": "gloo" if device == "cpu" else "nccl",
        "auto_mpi_discovery": False,
        "timeout": timedelta(minutes=cfg.train.dist_timeout_minutes),
    }


def param_groups(model: GPT, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices (Linear weights and embeddings). Biases and LayerNorm gains are 1-D: decaying
    them pulls gains towards 0 instead of 1 and offsets towards 0, constraining nothing useful.

    Under μP the hidden matrices form a group of their own, with `lr_scale` 1/m and weight decay times m
    (model/gpt.py's table); every group carries its `lr_scale`, which set_lr multiplies by the schedule's
    LR at each step. The standard parametrization gives the two groups, decay first, in model order."""
    scaling = model.param_scaling()
    groups: dict[tuple[bool, float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            s = scaling[name]
            groups.setdefault((p.dim() >= 2, s.lr, s.weight_decay), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay * wd_mult if decay else 0.0, "lr_scale": lr_scale}
        for (decay, lr_scale, wd_mult), params in groups.items()
    ]


def set_lr(optimizer: Any, lr: float) -> None:
    """The schedule's LR on every group of the (DeepSpeed-wrapped) optimizer, times the group's lr_scale:
    μP's per-layer learning rates follow the warmup, the decay and the batch ramp with the rest. A group
    without lr_scale (a checkpoint from before it existed, all standard) takes the LR as it is."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def engine_step(
    engine: Any,
    data: torch.Tensor,
    micro_batch: int,
    lr: float,
    *,
    loss_factor: float | None = None,
    judge: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Forward, backward and step through the DeepSpeed engine for every micro batch of `data` (this rank's
    rows of one optimizer step, n_ctx + 1 tokens each). DeepSpeed scales the loss for accumulation, reduces
    gradients across ranks, clips, and steps the optimizer only at the accumulation boundary. Returns the
    mean loss as a tensor, without a host-device sync. `loss_factor` (a fire drill) multiplies every loss.
    `judge` (train.on_spike=skip) sees the step's mean loss and grad norm before the update, and when it
    returns True the update is dropped.

    The boundary is stated, not left to DeepSpeed's running micro-step counter: that counter is not reset
    when a batch ramp changes the accumulation, so it would end steps part-way through this step's micro
    batches (ZeRO-2 reads the stated boundary when it reduces and when it steps)."""
    set_lr(engine.optimizer, lr)
    engine.train()
    total = torch.zeros((), device=data.device)
    chunks = data.split(micro_batch)
    for i, chunk in enumerate(chunks):
        engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
        loss = engine(chunk[:, :-1], chunk[:, 1:])[1]  # with targets the model returns no logits
        if loss_factor is not None:
            loss = loss * loss_factor
        engine.backward(loss)
        total += loss.detach().float()
        if judge is not None and i == len(chunks) - 1:
            opt = engine.optimizer  # ZeRO 1 or 2 (the config checks): the norm DeepSpeed's step computes
            if judge(total / len(chunks), opt.scaled_global_norm() / opt.loss_scale):
                _drop_update(engine)
                continue
        engine.step()
    return total / len(chunks)


def _drop_update(engine: Any) -> None:
    """Step through DeepSpeed's own overflow path, which zeroes the gradients, counts a skipped step and
    leaves weights and optimizer state as they were: mark this rank's reduced gradients non-finite and
    have the step check them (bf16 does not by default)."""
    opt = engine.optimizer
    for grads in opt.averaged_gradients.values():
        for g in grads or ():
            g.fill_(math.nan)
    checks, opt.check_grad_overflow = opt.check_grad_overflow, True
    try:
        engine.step()
    finally:
        opt.check_grad_overflow = checks


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
    if not t.cpu_offload:
        # torch's AdamW, not DeepSpeed's FusedAdam, which is compiled with nvcc at start-up and so needs a
        # CUDA toolkit on every GPU node; torch's fused kernel does one pass over each flat ZeRO partition,
        # on CUDA as on CPU (gpt3-small's CPU step drops from 4.5 to 3.0 s against the unfused one).
        adam["torch_adam"] = True
        adam["fused"] = True
    ds: dict[str, Any] = {
        "train_batch_size": t.micro_batch * gas * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        # bf16 needs no loss scale, so the overflow check before every step only costs a host sync (an
        # all-reduce and .item()); a NaN still shows in the loss, which stops the run.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every micro step; we time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"load_universal": False},
    }
    ds = merge_passthrough(ds, dict(cfg.deepspeed))
    if accumulates_in_bf16(cfg, gas):
        # DeepSpeed sums micro batches' gradients in the model's dtype by default: in bf16, 8 bits of
        # mantissa, the small gradients of later micro batches round away. Sum them in fp32 instead (ZeRO-2
        # keeps this rank's gradient partition in fp32: 2 more bytes per parameter / world size). A numeric
        # default, not a Config value: the pass-through may set data_types.grad_accum_dtype itself.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if t.zero_stage in (1, 2):
        # DeepSpeed's default buckets hold 5e8 elements each whatever the model; a bucket larger than the
        # model only costs memory (3.7 GB of empty fp32 buffers for the smoke model), so cap it there.
        # A tuning knob, not a Config value: the pass-through may set it.
        bucket = int(min(5e8, count_params(cfg.model)))
        ds["zero_optimization"].setdefault("reduce_bucket_size", bucket)
        ds["zero_optimization"].setdefault("allgather_bucket_size", bucket)
    return ds


def accumulates_in_bf16(cfg: Config, gas: int) -> bool:
    """Whether a bf16 step can sum several micro batches: now (gas > 1) or later in the batch ramp. ZeRO
    stages 1 to 3 take an fp32 accumulation dtype; DeepSpeed refuses it without ZeRO."""
    t = cfg.train
    return t.precision == "bf16" and t.zero_stage > 0 and (gas > 1 or cfg.schedule.ramp_tokens > 0)


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


def configure_model(cfg: Config, model: GPT) -> None:
    """What the config sets on the model from outside: activation checkpointing, compile, z-loss."""
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.compiled = cfg.train.compile  # the attention kernel choice reads it (model/attention.py)
    model.z_loss = cfg.optim.z_loss


def build_engine(cfg: Config, model: GPT, env: DistEnv, *, load_universal: bool = False) -> Any:
    """deepspeed.initialize with our generated config; activation checkpointing and compile applied
    from outside the model."""
    import deepspeed

    ds = deepspeed_config(cfg, world_size=env.world_size, device=env.device.type)
    if load_universal:
        ds["checkpoint"]["load_universal"] = True
    configure_model(cfg, model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds
    )
    if cfg.train.compile:
        engine.compile()
    return engine
