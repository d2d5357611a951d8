"""Training throughput: scalegpt's DeepSpeed step against a plain PyTorch loop of the same model.

Prints tokens/s, optimizer-step time, MFU (on GPU), peak memory and, with --baseline, the ratio to a
plain loop (torch AdamW, clipping at 1.0, the same precision) run in the same process on the same
batches. The two are interleaved step by step so that machine noise hits both alike; medians are reported.

A timed step is one optimizer step of the config's global batch (one process: global_batch / micro_batch
accumulated micro batches), as in a run. `train.global_batch=0` makes it a single micro batch, the worst
case for what DeepSpeed adds per optimizer step.

Under a launcher each rank runs both contenders on its share of the batch, and the plain loop is
torch's DistributedDataParallel (what a user writes for several processes without DeepSpeed); figures are
rank 0's, tokens/s counts all ranks.

    python bench/train.py configs/smoke.yaml --baseline
    python bench/train.py configs/gpt3-small.yaml train.micro_batch=1 train.global_batch=4 --steps 3 --baseline
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_local_rank bench/train.py configs/smoke.yaml --baseline
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from scalegpt.model import build_model
from scalegpt.model.flops import flops_per_token, mfu, peak_flops_for
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import Config
from scalegpt.train.config.validation import global_batch
from scalegpt.train.engine import build_engine, engine_step, init_distributed, param_groups


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the whole process


def plain_loop(
    cfg: Config, device: torch.device, fused: bool, world_size: int
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The baseline: what a user would write without DeepSpeed (autocast for bf16, fp32 master weights;
    DDP, synchronising only the last micro batch of a step, when there are several processes)."""
    model: torch.nn.Module = build_model(cfg.model, device=device, seed=cfg.run.seed)
    if cfg.train.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    o = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    micro = cfg.train.micro_batch

    def step(data: torch.Tensor, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        chunks = data.split(micro)
        total = torch.zeros((), device=device)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or world_size == 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    _, loss = model(chunk[:, :-1], chunk[:, 1:])
                (loss / len(chunks)).backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / len(chunks)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    p.add_argument("--baseline", action="store_true", help="also run the plain PyTorch loop and print the ratio")
    p.add_argument("--plain-fused", action="store_true", help="the plain loop uses torch's fused AdamW on CPU too")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    env = init_distributed(cfg)
    device = env.device
    torch.manual_seed(cfg.run.seed)
    engine = build_engine(cfg, build_model(cfg.model, device=device, seed=cfg.run.seed), env)
    contenders: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
        "scalegpt (DeepSpeed)": lambda data, lr: engine_step(engine, data, cfg.train.micro_batch, lr)
    }
    # What a user writes: torch's default AdamW, which is fused only on CUDA; --plain-fused takes the fused
    # kernel on CPU too, as scalegpt does, to isolate what DeepSpeed itself costs.
    plain_fused = args.plain_fused or device.type == "cuda"
    if args.baseline:
        contenders["plain PyTorch"] = plain_loop(cfg, device, plain_fused, env.world_size)
    gen = torch.Generator().manual_seed(env.rank)  # each rank its own rows of the global batch
    rows = global_batch(cfg, env.world_size)
    shape = (rows // env.world_size, cfg.model.n_ctx + 1)
    batches = [torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in range(args.warmup + args.steps)]
    times: dict[str, list[float]] = {name: [] for name in contenders}
    losses: dict[str, float] = {}
    for i, batch in enumerate(batches):
        data = batch.to(device)
        for name, step in contenders.items():  # interleaved: noise hits both alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            if env.world_size > 1:
                torch.distributed.barrier()  # all ranks start the step together
            t0 = time.perf_counter()
            loss = step(data, cfg.optim.lr)
            losses[name] = loss.item()  # a sync, so the timing covers the whole step
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    if not env.is_main:
        return
    tokens = rows * cfg.model.n_ctx  # all ranks
    peak = peak_flops_for(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", cfg.train.precision)
    print(f"# {args.config} {' '.join(args.overrides)}")
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, device {device}, {cfg.train.precision}, ZeRO-{cfg.train.zero_stage}, "
        f"compile={cfg.train.compile}, plain AdamW fused={plain_fused}, "
        f"{env.world_size} process(es), micro batch {cfg.train.micro_batch} x {cfg.model.n_ctx} tokens, "
        f"{shape[0] // cfg.train.micro_batch} micro batches per step, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    print(f"{'contender':<22} {'step ms':>9} {'tokens/s':>11} {'MFU':>7} {'last loss':>10}")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = tokens / med
        util = f"{mfu(rate[name] / env.world_size, cfg.model, peak):.1%}" if peak else "n/a"
        print(f"{name:<22} {med * 1e3:>9.1f} {rate[name]:>11,.0f} {util:>7} {losses[name]:>10.4f}")
    from scalegpt.launch.memory import peak_memory

    predicted = (
        peak_memory(cfg, env.world_size, cfg.train.micro_batch, cfg.train.activation_checkpointing).total / 2**30
    )
    kind = "allocated on GPU" if device.type == "cuda" else "process RSS, not comparable"
    print(f"peak memory: {peak_memory_gb(device):.2f} GiB ({kind}); `scalegpt plan` predicts {predicted:.2f} GiB")
    if args.baseline:
        ratio = rate["scalegpt (DeepSpeed)"] / rate["plain PyTorch"]
        print(f"ratio scalegpt / plain PyTorch: {ratio:.3f}x (target >= 0.95x)")
    print(f"flops per token: {flops_per_token(cfg.model):.3e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
