"""`scalegpt plan CONFIG [--gpus N] [--gpu-memory GB] [--tflops T]`: will a run fit, with which micro
batch, and how long will it take? (`--compute C --from LADDER` sizes a run from an IsoFLOP ladder instead:
launch/ladder/compute.py.) Arithmetic only (model/flops.py for FLOPs, launch/memory.py for bytes,
train/schedule.py's run_totals for the tokens through the batch ramp): nothing is allocated or launched.

``plan_resources`` returns a ResourcePlan of numbers for tests and benchmarks (a GPU benchmark compares a
real run's peak memory with ``ResourcePlan.peak.total``); ``format_plan`` turns it into the printed report.
On CPU, DeepSpeed ZeRO-2 runs of the smoke model peak 5-8% below ``ResourcePlan.peak.total``
(tests/test_plan.py).

Which model-state accounting the plan *uses* (for the peak and the recommended micro batch): for
ZeRO-2 runs, DeepSpeed's own estimate (2Ψ + 18Ψ/N in 16 bits, 4Ψ + 16Ψ/N in fp32; see
``deepspeed_zero2_model_states``), because that is what DeepSpeed allocates and what tests/test_plan.py
measures; for stages 0, 1 and 3, the ZeRO paper's (16Ψ split by stage). Both are printed.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..model.config import ModelConfig
from ..model.flops import PEAK_FLOPS, count_params, flops_per_token
from ..train.config.loading import load_config
from ..train.config.schema import Config
from ..train.engine import compiled_ops_note
from ..train.errors import UserError
from ..train.schedule import Totals, run_totals
from .ladder.compute import compute_command
from .memory import (
    ActivationMemory,
    GiB,
    ModelStateBytes,
    PeakMemory,
    activation_memory,
    deepspeed_zero2_model_states,
    peak_memory,
    states_for_stage,
    zero_model_states,
)

HEADROOM = 0.10
"""Fraction of GPU memory kept free: the CUDA context and kernels (~0.5-1 GiB), NCCL buffers, and the
caching allocator's fragmentation, none of which the arithmetic counts."""

MAX_MICRO_BATCH = 1024
"""Largest micro batch tried when train.global_batch is 0 (so any micro batch is allowed)."""


@dataclass(frozen=True)
class BatchChoice:
    """A micro batch that fits, and the accumulation that makes it reach the global batch."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    peak: PeakMemory


@dataclass(frozen=True)
class ResourcePlan:
    """Everything `scalegpt plan` prints, as numbers (bytes, FLOPs, seconds)."""

    model: ModelConfig
    gpus: int
    gpu_memory: float
    """Bytes per GPU (--gpu-memory, read as GiB)."""
    usable_memory: float
    """gpu_memory less HEADROOM: what the peak must stay under."""
    tflops: float
    precision: str
    zero_stage: int
    cpu_offload: bool
    params: int
    params_non_embedding: int
    flops_per_token: float
    zero_mixed: tuple[ModelStateBytes, ...]
    """ZeRO paper, mixed-precision Adam (2+2+12 bytes per parameter), indexed by stage 0-3."""
    zero_fp32: tuple[ModelStateBytes, ...]
    """ZeRO paper's split applied to fp32 Adam (4+4+8, no master copy), indexed by stage 0-3."""
    deepspeed_zero2: ModelStateBytes
    """DeepSpeed's ZeRO-2 estimate in the config's precision (and offload setting)."""
    model_states: ModelStateBytes
    """The accounting used below for the configured stage (see the module docstring)."""
    micro_batch: int
    checkpointing: bool
    activations: ActivationMemory
    """At the configured micro batch, flash attention (what the model runs)."""
    activations_no_flash: ActivationMemory
    """At the configured micro batch, attention probabilities materialized (Korthikanti et al.)."""
    peak: PeakMemory
    """At the configured micro batch and activation-checkpointing setting."""
    global_batch: int
    """Sequences per optimizer step (train.global_batch, or micro batch x GPUs when that is 0)."""
    grad_accum: int | None
    """Accumulation steps at the configured micro batch; None when it cannot reach global_batch."""
    recommended: BatchChoice | None
    """Largest micro batch that fits without activation checkpointing, if any."""
    recommended_checkpointing: BatchChoice | None
    """Largest micro batch that fits with activation checkpointing, if any."""
    batch_error: str | None
    """Why the batches cannot be made on this many GPUs, if they cannot: the global batch does not split
    into whole micro batches, or the batch ramp's quantum does not."""
    tokens_per_step: int
    step_seconds: float
    """tokens_per_step x flops_per_token / (gpus x tflops)."""
    max_steps: int
    samples: int
    """Sequences in max_steps steps, through the batch ramp (train/schedule.py's run_totals)."""
    tokens: int
    """samples x n_ctx."""
    train_days: float
    """tokens x flops_per_token / (gpus x tflops): the ramp's small early steps take less time."""


def _divisors_descending(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def _choose(cfg: Config, gpus: int, usable: float, checkpointing: bool, per_gpu: int | None) -> BatchChoice | None:
    """Largest micro batch that fits: a divisor of the per-GPU batch when the global batch is fixed
    (the GPT-3 batches are powers of two, so this is the largest power of two), else a power of two."""
    if per_gpu is None:
        candidates = [2**k for k in range(int(math.log2(MAX_MICRO_BATCH)), -1, -1)]
    else:
        candidates = _divisors_descending(per_gpu)
    for micro in candidates:  # peak grows with the micro batch, so the first that fits is the largest
        accum = 1 if per_gpu is None else per_gpu // micro
        peak = peak_memory(cfg, gpus, micro, checkpointing, accum)
        if peak.total <= usable:
            return BatchChoice(micro_batch=micro, grad_accum=accum, checkpointing=checkpointing, peak=peak)
    return None


def _check_arguments(gpus: int, gpu_memory_gb: float, tflops: float) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UserError(f"--gpus must be a positive integer, got {gpus}")
    if not (math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise UserError(f"--gpu-memory must be a positive number of GB per GPU, got {gpu_memory_gb}")
    if not (math.isfinite(tflops) and tflops > 0):
        raise UserError(f"--tflops must be a positive number, got {tflops}")


@dataclass(frozen=True)
class _Batch:
    """How the global batch splits over the GPUs at the configured micro batch."""

    global_batch: int
    per_gpu: int | None
    """Sequences per GPU per step; None when any micro batch is allowed or the split is impossible."""
    grad_accum: int | None
    error: str | None


def _split_batch(cfg: Config, gpus: int) -> _Batch:
    t = cfg.train
    if not t.global_batch:
        return _Batch(global_batch=t.micro_batch * gpus, per_gpu=None, grad_accum=1, error=None)
    if t.global_batch % gpus:
        error = (
            f"train.global_batch={t.global_batch} cannot be split evenly over {gpus} GPUs; use a GPU count "
            f"that divides {t.global_batch}, or set train.global_batch to a multiple of {gpus}"
        )
        return _Batch(global_batch=t.global_batch, per_gpu=None, grad_accum=None, error=error)
    per_gpu = t.global_batch // gpus
    accum = per_gpu // t.micro_batch if per_gpu % t.micro_batch == 0 else None
    return _Batch(global_batch=t.global_batch, per_gpu=per_gpu, grad_accum=accum, error=None)


def _totals(cfg: Config, gpus: int, batch_error: str | None) -> tuple[Totals, str | None]:
    """The run's totals through the batch ramp, and why the batches cannot be made on this many GPUs, if
    they cannot (the global batch does not split, or the ramp's quantum does not): then there is no run to
    count, and plan_command refuses it after the report."""
    if batch_error is None:
        try:
            return run_totals(cfg, gpus), None
        except UserError as exc:
            batch_error = str(exc)
    return Totals(cfg.train.max_steps, 0, 0), batch_error


def plan_resources(cfg: Config, gpus: int, gpu_memory_gb: float, tflops: float) -> ResourcePlan:
    """The plan for `cfg` on `gpus` data-parallel GPUs of `gpu_memory_gb` GiB each, sustaining `tflops`
    model TFLOP/s each (MFU x peak; recompute is not added). Raises UserError on bad arguments."""
    _check_arguments(gpus, gpu_memory_gb, tflops)
    m, t = cfg.model, cfg.train
    n_params = count_params(m)
    usable = gpu_memory_gb * GiB * (1 - HEADROOM)
    batch = _split_batch(cfg, gpus)
    choices = [None if batch.error else _choose(cfg, gpus, usable, ckpt, batch.per_gpu) for ckpt in (False, True)]
    tokens_per_step = batch.global_batch * m.n_ctx
    step_seconds = tokens_per_step * flops_per_token(m) / (gpus * tflops * 1e12)
    totals, error = _totals(cfg, gpus, batch.error)
    return ResourcePlan(
        model=m,
        gpus=gpus,
        gpu_memory=gpu_memory_gb * GiB,
        usable_memory=usable,
        tflops=tflops,
        precision=t.precision,
        zero_stage=t.zero_stage,
        cpu_offload=t.cpu_offload,
        params=n_params,
        params_non_embedding=count_params(m, non_embedding=True),
        flops_per_token=flops_per_token(m),
        zero_mixed=tuple(zero_model_states(n_params, stage=s, gpus=gpus, precision="bf16") for s in range(4)),
        zero_fp32=tuple(zero_model_states(n_params, stage=s, gpus=gpus, precision="fp32") for s in range(4)),
        deepspeed_zero2=deepspeed_zero2_model_states(
            n_params, gpus=gpus, precision=t.precision, cpu_offload=t.cpu_offload
        ),
        model_states=states_for_stage(cfg, n_params, gpus),
        micro_batch=t.micro_batch,
        checkpointing=t.activation_checkpointing,
        activations=activation_memory(m, t.micro_batch, precision=t.precision, flash=True),
        activations_no_flash=activation_memory(m, t.micro_batch, precision=t.precision, flash=False),
        peak=peak_memory(cfg, gpus, t.micro_batch, t.activation_checkpointing, batch.grad_accum or 1),
        global_batch=batch.global_batch,
        grad_accum=batch.grad_accum,
        recommended=choices[0],
        recommended_checkpointing=choices[1],
        batch_error=error,
        tokens_per_step=tokens_per_step,
        step_seconds=step_seconds,
        max_steps=t.max_steps,
        samples=totals.samples,
        tokens=totals.tokens,
        train_days=totals.tokens * flops_per_token(m) / (gpus * tflops * 1e12) / 86400,
    )


def _unit(plan: ResourcePlan) -> tuple[str, float]:
    """GiB for real models, MiB when everything but DeepSpeed's fixed-size buckets is under 1 GiB."""
    largest = max(plan.zero_mixed[0].total, plan.activations_no_flash.without_checkpointing)
    return ("GiB", GiB) if largest >= GiB else ("MiB", 2.0**20)


def _count(n: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:,.3g}{suffix}"
    return f"{n:,.0f}"


def _duration(seconds: float) -> str:
    for size, name in ((86400.0, "days"), (3600.0, "hours"), (60.0, "minutes")):
        if seconds >= size:
            return f"{seconds / size:,.3g} {name}"
    return f"{seconds:.3g} s"


class _Report:
    """format_plan's sections, each a method that returns its lines, in one memory unit."""

    def __init__(self, plan: ResourcePlan) -> None:
        self.plan = plan
        self.unit, self.scale = _unit(plan)

    def mem(self, x: float, width: int = 0) -> str:
        return f"{x / self.scale:>{width},.2f}"

    def header(self, source: str) -> list[str]:
        plan, m = self.plan, self.plan.model
        offload = ", ZeRO-Offload" if plan.cpu_offload else ""
        return [
            f"plan for {source or 'config'}: {plan.gpus} GPU(s) x {plan.gpu_memory / GiB:g} GiB, {plan.precision}, "
            f"ZeRO-{plan.zero_stage}{offload}",
            "",
            f"parameters       {plan.params:,} ({plan.params_non_embedding:,} without the position embedding); "
            f"{m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, n_ctx {m.n_ctx}, vocab {m.vocab_size}",
            f"training FLOPs   {plan.flops_per_token:.4g} per token (6N + 12·L·d·T, PaLM Appendix B)",
            "",
        ]

    def model_states(self) -> list[str]:
        plan, mem, unit = self.plan, self.mem, self.unit
        lines = [
            f"model states per GPU on {plan.gpus} GPU(s), {unit} (Ψ = {plan.params:,}):",
            "  ZeRO   mixed precision: params   grads  optimizer    total  |  fp32: total  |  DeepSpeed estimate",
        ]
        for stage in range(4):
            mp, f32 = plan.zero_mixed[stage], plan.zero_fp32[stage]
            ds = mem(plan.deepspeed_zero2.total, 10) if stage == 2 else f"{'-':>10}"
            lines.append(
                f"  {stage:<4} {mem(mp.params, 24)} {mem(mp.grads, 7)} {mem(mp.optimizer, 10)} {mem(mp.total, 8)}"
                f"  |  {mem(f32.total, 11)}  |  {ds}"
            )
        formula = (
            "4Ψ + 16Ψ/N (its fp32 mode still clones an fp32 master partition)"
            if plan.precision == "fp32"
            else "2Ψ + 18Ψ/N (estimate_zero2_model_states_mem_needs)"
        )
        host = f", {mem(plan.deepspeed_zero2.offloaded)} {unit} of it in host memory" if plan.cpu_offload else ""
        used = "DeepSpeed's estimate" if plan.zero_stage == 2 else "the ZeRO paper's accounting"
        lines += [
            "  ZeRO paper: mixed precision 2Ψ + 2Ψ + 12Ψ, fp32 4Ψ + 4Ψ + 8Ψ (no master copy); stage 1 splits the "
            "optimizer states over N, 2 also the gradients, 3 also the parameters.",
            f"  DeepSpeed's ZeRO-2 estimate ({plan.precision}): {formula}{host}.",
            f"  Used below for ZeRO-{plan.zero_stage}: {used}, {mem(plan.model_states.total)} {unit} on the GPU.",
        ]
        if plan.peak.buffers:
            lines.append(
                f"  Plus ZeRO gradient buckets during backward: {mem(plan.peak.buffers)} {unit} "
                "(deepspeed.zero_optimization.reduce_bucket_size, doubled by overlap_comm)."
            )
        if plan.zero_stage == 3:
            lines.append("  ZeRO-3's prefetch and gather buffers are not modeled.")
        return [*lines, ""]

    def activations(self) -> list[str]:
        plan, mem = self.plan, self.mem
        a, n = plan.activations, plan.activations_no_flash
        return [
            f"activations per GPU at micro batch {plan.micro_batch} ({plan.precision} values), {self.unit}:",
            "                                         per layer   all layers + loss peak",
            f"  attention probabilities (Korthikanti) {mem(n.layer, 11)} {mem(n.without_checkpointing, 16)}",
            f"  flash attention (what runs)           {mem(a.layer, 11)} {mem(a.without_checkpointing, 16)}",
            f"  flash + activation checkpointing      {mem(a.layer_input, 11)} {mem(a.with_checkpointing, 16)}",
            f"  of which the loss (chunked logits)    {'':>11} {mem(a.logits, 16)}",
            "",
        ]

    def peak(self) -> list[str]:
        plan, p, mem = self.plan, self.plan.peak, self.mem
        ckpt = "with" if plan.checkpointing else "without"
        verdict = "fits" if p.total <= plan.usable_memory else "DOES NOT FIT"
        accumulated = f" + accumulated gradients {mem(p.grads)}" if p.accumulation > 1 else ""
        return [
            f"peak per GPU at micro batch {plan.micro_batch}, {ckpt} activation checkpointing: {mem(p.total)} "
            f"{self.unit} of {mem(plan.usable_memory)} usable ({HEADROOM:.0%} headroom): {verdict}",
            f"  backward {mem(p.backward)} = states {mem(p.states)}{accumulated} + buckets {mem(p.buffers)} "
            f"+ activations {mem(p.activations)}; optimizer step {mem(p.step)}",
            "",
        ]

    def choice(self, label: str, choice: BatchChoice | None) -> str:
        if choice is None:
            return (
                f"  {label}: nothing fits, even micro batch 1; use more GPUs, ZeRO-3 (train.zero_stage=3), "
                "train.cpu_offload=true or a smaller model"
            )
        batch = choice.micro_batch * choice.grad_accum * self.plan.gpus
        return (
            f"  {label}: micro batch {choice.micro_batch} x accumulation {choice.grad_accum} x {self.plan.gpus} "
            f"GPU(s) = global batch {batch}; peak {self.mem(choice.peak.total)} {self.unit}"
        )

    def batch(self) -> list[str]:
        plan = self.plan
        if plan.batch_error:
            return [f"batch: {plan.batch_error}", ""]
        if plan.grad_accum is None:
            first = (
                f"batch: train.micro_batch={plan.micro_batch} does not divide the per-GPU batch "
                f"{plan.global_batch // plan.gpus}; pick one of the micro batches below"
            )
        else:
            first = (
                f"batch: global {plan.global_batch} sequences = micro {plan.micro_batch} x accumulation "
                f"{plan.grad_accum} x {plan.gpus} GPU(s)"
            )
        return [
            first,
            "recommended micro batch (largest that fits):",
            self.choice("without activation checkpointing", plan.recommended),
            self.choice("with activation checkpointing   ", plan.recommended_checkpointing),
            "",
        ]

    def time(self) -> list[str]:
        plan = self.plan
        h100 = plan.tflops * 1e12 / PEAK_FLOPS["H100"]
        total = (
            f"training time: {plan.max_steps:,} steps, {plan.samples:,} samples, {plan.tokens:,} tokens "
            f"({_count(plan.tokens)}, through the batch ramp) = {_duration(plan.train_days * 86400)} on "
            f"{plan.gpus} GPU(s)"
        )
        if plan.batch_error:  # no run to count: its batches cannot be made (the batch line says why)
            total = f"training time: not counted, since the batches cannot be made on {plan.gpus} GPU(s)"
        return [
            f"step time at {plan.tflops:g} model TFLOPS per GPU ({h100 * 100:.2g}% MFU on an H100): "
            f"{plan.tokens_per_step:,} tokens x {plan.flops_per_token:.4g} FLOPs / ({plan.gpus} x "
            f"{plan.tflops:g}e12) = {plan.step_seconds:.3g} s",
            total,
        ]


def format_plan(plan: ResourcePlan, source: str = "") -> str:
    """The human-readable report of a ResourcePlan."""
    r = _Report(plan)
    sections = (r.header(source), r.model_states(), r.activations(), r.peak(), r.batch(), r.time())
    return "\n".join(line for section in sections for line in section)


def plan_command(args: argparse.Namespace) -> int:
    """`scalegpt plan`: print the plan; a global batch that cannot be reached exactly is an error
    (after the report, so the rest of it is still seen)."""
    if args.compute is not None or args.from_dir is not None or args.write is not None:
        return compute_command(args)
    cfg = load_config(args.config, args.overrides)
    plan = plan_resources(cfg, args.gpus, args.gpu_memory, args.tflops)
    print(format_plan(plan, str(args.config)), flush=True)
    print(f"compiled at start-up: {compiled_ops_note(cfg) or 'nothing'}", flush=True)
    if plan.batch_error:
        raise UserError(plan.batch_error)
    return 0
