"""Memory arithmetic for `scalegpt plan`: the bytes one GPU holds for model states (parameters, gradients,
optimizer states under ZeRO), DeepSpeed's reduction buckets, and one micro batch's activations, and the
per-GPU peak they add up to (``peak_memory``, which reads the bucket and accumulation settings from the
DeepSpeed JSON train/engine.py generates). Plain Python, closed-form, so a 175B run can be sized on a
laptop. Sources:

- model states: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", Sections 3.1 and 5, and DeepSpeed's own ZeRO-2 estimate
  (``estimate_zero2_model_states_mem_needs`` in deepspeed/runtime/zero/stage_1_and_2.py);
- activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Section 4.1, with the attention terms of flash attention (Dao et al. 2022) beside it;
- the loss: model/loss.py's chunks (model/flops.py's loss_chunks).

Memory is in bytes (floats, since partitions divide); Ψ below is the parameter count, N the number of
data-parallel GPUs, s the sequence length, b the micro batch, h d_model, a the heads, V the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig
from ..model.flops import count_params, loss_chunks
from ..train.config.schema import Config
from ..train.engine import deepspeed_config

GiB = float(2**30)


def value_bytes(precision: str) -> int:
    """Bytes per parameter, gradient or activation value in the model's training dtype. DeepSpeed's
    bf16 and fp16 modes cast the whole module to 16 bits, so activations are 16-bit too."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be 'bf16', 'fp16' or 'fp32', got {precision!r}")
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class ModelStateBytes:
    """Model-state bytes held by one GPU (the ZeRO paper's "model states", Section 3.1)."""

    params: float
    """Parameters in the training dtype (16-bit, or fp32 for an fp32 run)."""
    grads: float
    """Gradients kept for the optimizer step."""
    optimizer: float
    """Optimizer states: Adam's momentum and variance, plus the fp32 master copy where there is one."""
    offloaded: float = 0.0
    """Bytes the same GPU's rank keeps in host memory instead (ZeRO-Offload); not in ``total``."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_model_states(n_params: int, *, stage: int, gpus: int, precision: str) -> ModelStateBytes:
    """Per-GPU model states under ZeRO stage 0-3, by the ZeRO paper's accounting (Sections 3.1, 5).

    Mixed precision (bf16/fp16) Adam keeps 2Ψ 16-bit parameters, 2Ψ 16-bit gradients and KΨ = 12Ψ
    optimizer states (fp32 master parameters, momentum and variance): 16Ψ. fp32 training keeps 4Ψ
    parameters, 4Ψ gradients and 8Ψ for the two moments, with no master copy: also 16Ψ. Stage 1
    (P_os) divides the optimizer states by N, stage 2 (P_os+g) also the gradients, stage 3
    (P_os+g+p) also the parameters. Buffers, activations and fragmentation are not model states."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    v = value_bytes(precision)
    optimizer_per_param = 8 if precision == "fp32" else 12
    return ModelStateBytes(
        params=v * n_params / (gpus if stage >= 3 else 1),
        grads=v * n_params / (gpus if stage >= 2 else 1),
        optimizer=optimizer_per_param * n_params / (gpus if stage >= 1 else 1),
    )


def deepspeed_zero2_model_states(
    n_params: int, *, gpus: int, precision: str, cpu_offload: bool = False
) -> ModelStateBytes:
    """Per-GPU model states of DeepSpeed's ZeRO-2, following its own estimate
    (``estimate_zero2_model_states_mem_needs``): 2Ψ for the 16-bit parameters plus 18Ψ/N for this
    rank's partitions (2 for its 16-bit gradients, 4 for their fp32 copy made at the optimizer step,
    4 for the fp32 master parameters, 8 for momentum and variance). With ZeRO-Offload only the 2Ψ
    stays on the GPU, the rest lives in host memory (``offloaded``).

    The estimate is for 16-bit training. For fp32 we follow the same code (stage_1_and_2.py): the
    gradient partition is already fp32, so no second copy, but DeepSpeed still clones an fp32 master
    partition, so 4Ψ + 16Ψ/N, more than the ZeRO paper's fp32 16Ψ (no master) whenever N < 4 --
    measured in tests/test_plan.py. This is the accounting `scalegpt plan` uses for ZeRO-2 runs."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    v = value_bytes(precision)
    grads_per_param = v + (0 if v == 4 else 4)  # the partition, plus its fp32 copy when 16-bit
    partitioned = (grads_per_param + 12) * n_params / gpus
    if cpu_offload:
        return ModelStateBytes(params=v * n_params, grads=0.0, optimizer=0.0, offloaded=partitioned)
    return ModelStateBytes(params=v * n_params, grads=grads_per_param * n_params / gpus, optimizer=12 * n_params / gpus)


DEEPSPEED_REDUCE_BUCKET_SIZE = 500_000_000
"""DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (elements), deepspeed/runtime/zero/config.py."""


def zero_bucket_bytes(
    *, precision: str, reduce_bucket_size: int = DEEPSPEED_REDUCE_BUCKET_SIZE, overlap_comm: bool = True
) -> float:
    """Gradient-reduction buckets of DeepSpeed ZeRO-1/2 with contiguous gradients: one buffer of
    ``reduce_bucket_size`` elements in the gradient dtype, two when ``overlap_comm`` double-buffers
    (``setup_buckets`` in stage_1_and_2.py). At the default 5e8 elements that is 1.9 GiB in bf16, as
    much as gpt3-small's 16-bit weights and gradients together. They live from the first backward until
    the gradients are partitioned, so they count against the backward peak, not the optimizer step."""
    return (2 if overlap_comm else 1) * reduce_bucket_size * value_bytes(precision)


def loss_peak_bytes(config: ModelConfig, rows: int, precision: str) -> float:
    """Peak bytes of model/loss.py's chunked cross-entropy over `rows` positions (micro batch x
    n_ctx). Forward, per chunk: the fp32 logits and logsumexp's fp32 temporary (16-bit logits live
    only while cast). Backward, per slice: the fp32 softmax of the recomputed logits and, in 16 bits,
    its cast back, beside the whole head-weight gradient (vocab x d_model, training dtype) and the
    fp32 input gradient (rows x d_model). The larger of the two."""
    v, vocab, h = value_bytes(precision), config.vocab_size, config.d_model
    chunk_rows, vocab_slice = loss_chunks(rows, vocab)
    forward = min(chunk_rows, rows) * vocab * (4 + 4)
    cast = v if v < 4 else 0  # a 16-bit copy of the fp32 softmax; in fp32 it is the same tensor
    backward = rows * min(vocab_slice, vocab) * (4 + cast) + vocab * h * v + rows * h * 4
    return float(max(forward, backward))


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one micro batch on one GPU, and where the backward pass peaks.

    Counted per tensor that autograd saves in gpt.py's Block, following Korthikanti et al. 2022,
    Section 4.1 (in units of s·b·h values): the two LayerNorm inputs (2), the c_attn input (1), q, k
    and v (3), the c_proj input (1), the c_fc input (1), the GELU input and output (2·d_ff/h = 8),
    plus 1-byte dropout masks when dropout > 0. Attention itself saves either the softmax
    probabilities (a·s² values per sequence, plus their dropout mask and output when dropout > 0) or,
    with fused attention (SDPA's flash and memory-efficient kernels, the banded layers' mask included;
    compiled flex attention), only its
    output (s·b·h) and the fp32 log-sum-exp (a·s·b): no s² term. With 16-bit values, dropout and
    d_ff = 4h the non-flash count is exactly the paper's s·b·h·(34 + 5·a·s/h)."""

    micro_batch: int
    n_layer: int
    layer: float
    """Bytes one block saves for its backward, without recompute."""
    layer_input: float
    """Bytes one block keeps under full activation checkpointing: its input, s·b·h values
    (torch.utils.checkpoint, non-reentrant); the paper's 2·s·b·h in 16 bits."""
    head: float
    """The final LayerNorm's input and the output layer's input (s·b·h values each), and the embedding
    dropout mask when dropout > 0."""
    working: float
    """Gradients in flight inside one block's backward: the GELU's incoming and outgoing gradients
    (d_ff wide) and the residual stream's gradient, s·b·h·(2·d_ff/h + 1) values."""
    logits: float
    """The loss' peak (``loss_peak_bytes``): the chunked cross-entropy of model/loss.py holds about
    LOSS_CHUNK_ELEMENTS logits at a time, plus the head-weight and input gradients in backward.
    Unchunked (``logits.float()`` and ``F.cross_entropy``) it would be b·s·V·(12 + value bytes),
    for GPT-2's vocabulary more than all the layers' activations together."""

    @property
    def without_checkpointing(self) -> float:
        """Peak: every block's saved tensors, plus the larger of the loss' peak (the first thing
        backward does) and the last block's gradients in flight."""
        return self.n_layer * self.layer + self.head + max(self.logits, self.working)

    @property
    def with_checkpointing(self) -> float:
        """Peak: the blocks' inputs (Korthikanti et al.'s 2·s·b·h·L for full recomputation), plus the
        larger of the loss' peak and one block recomputed in backward with its gradients in flight."""
        return self.n_layer * self.layer_input + self.head + max(self.logits, self.layer + self.working)

    def peak(self, checkpointing: bool) -> float:
        return self.with_checkpointing if checkpointing else self.without_checkpointing


def activation_memory(
    config: ModelConfig, micro_batch: int, *, precision: str = "bf16", flash: bool = True
) -> ActivationMemory:
    """Activation memory of one micro batch of full n_ctx sequences (see ActivationMemory for the
    accounting). ``flash=False`` gives Korthikanti et al.'s count with materialized attention
    probabilities; ``flash=True`` is what model/attention.py's kernels save.
    Ignored as small: LayerNorm's per-token mean and rstd, and the embedding's saved token indices.
    Parameter gradients are model states, counted apart."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    v = value_bytes(precision)
    s, b, h, a = config.n_ctx, micro_batch, config.d_model, config.n_head
    sbh = s * b * h
    dropout = config.dropout > 0
    values = 2 + 1 + 3 + 1 + 1 + 2 * config.ffn_dim / h  # LN inputs, c_attn in, q k v, c_proj in, c_fc in, GELU
    masks = 2 if dropout else 0  # residual dropouts after attention and MLP, 1 byte per value
    if flash:
        attention = sbh * v + 4 * a * s * b  # the kernel's output and its fp32 log-sum-exp
    else:
        probs = a * s * s * b
        attention = probs * v + (probs * (1 + v) if dropout else 0)  # softmax out; dropout mask and out
    layer = sbh * (values * v + masks) + attention
    head = sbh * (2 * v + (1 if dropout else 0))
    logits = loss_peak_bytes(config, s * b, precision)
    return ActivationMemory(
        micro_batch=micro_batch,
        n_layer=config.n_layer,
        layer=layer,
        layer_input=float(sbh * v),
        head=float(head),
        working=float(sbh * v * (2 * config.ffn_dim / h + 1)),
        logits=logits,
    )


@dataclass(frozen=True)
class PeakMemory:
    """Predicted peak bytes on one GPU for one micro batch. Two moments compete: the start of a
    backward pass (every activation and the loss' peak alive, gradient buckets allocated) and the
    optimizer step (activations and buckets freed, the fp32 gradient partition made)."""

    states: float
    """Parameters and optimizer states (with any fp32 master copy), alive throughout."""
    grads: float
    """The gradient partition in the training dtype. It fills up during backward while activations
    are freed, so it adds to the backward peak only when an earlier micro batch's gradients are
    being accumulated into (accumulation > 1)."""
    buffers: float
    """DeepSpeed's gradient-reduction buckets (ZeRO-1/2), alive during backward."""
    activations: float
    """Saved activations and the loss' peak (ActivationMemory.peak)."""
    step_extra: float
    """ZeRO-1/2's optimizer step: the flattened copy of the gradient partition and, in 16 bits, its
    fp32 cast (``step`` in deepspeed/runtime/zero/stage_1_and_2.py)."""
    accumulation: int
    """Micro batches per optimizer step on this GPU."""

    @property
    def backward(self) -> float:
        accumulated = self.grads if self.accumulation > 1 else 0.0
        return self.states + accumulated + self.buffers + self.activations

    @property
    def step(self) -> float:
        return self.states + self.grads + self.step_extra

    @property
    def total(self) -> float:
        return max(self.backward, self.step)


def _bucket_bytes(cfg: Config, gpus: int) -> float:
    """ZeRO-1/2 gradient buckets, read from the DeepSpeed JSON the engine will generate (one source of
    truth: a `deepspeed:` pass-through of zero_optimization.reduce_bucket_size is seen here too)."""
    if cfg.train.zero_stage not in (1, 2):
        return 0.0
    zero = deepspeed_config(cfg, world_size=gpus, device="cuda", accumulation=1)["zero_optimization"]
    if not zero.get("contiguous_gradients", True):  # DeepSpeed's default is on
        return 0.0
    try:
        size = int(float(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET_SIZE)))
    except (TypeError, ValueError):
        size = DEEPSPEED_REDUCE_BUCKET_SIZE
    return zero_bucket_bytes(
        precision=cfg.train.precision, reduce_bucket_size=size, overlap_comm=bool(zero.get("overlap_comm", False))
    )


def states_for_stage(cfg: Config, n_params: int, gpus: int) -> ModelStateBytes:
    """The model states `plan` uses for the configured stage (see launch/plan.py's module docstring)."""
    t = cfg.train
    if t.zero_stage == 2:
        return deepspeed_zero2_model_states(n_params, gpus=gpus, precision=t.precision, cpu_offload=t.cpu_offload)
    states = zero_model_states(n_params, stage=t.zero_stage, gpus=gpus, precision=t.precision)
    if t.cpu_offload:  # ZeRO-Offload moves the optimizer states (and their step) to the host
        states = ModelStateBytes(params=states.params, grads=states.grads, optimizer=0.0, offloaded=states.optimizer)
    return states


def _accumulates_in_fp32(cfg: Config, gpus: int, accumulation: int) -> bool:
    """Whether the DeepSpeed JSON the engine will generate sums gradients in fp32 (read from it, so a
    `deepspeed:` pass-through of data_types.grad_accum_dtype is seen here too)."""
    ds = deepspeed_config(cfg, world_size=gpus, device="cuda", accumulation=accumulation)
    return cfg.train.precision != "fp32" and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"


def peak_memory(cfg: Config, gpus: int, micro_batch: int, checkpointing: bool, accumulation: int = 1) -> PeakMemory:
    """Predicted per-GPU peak for this config on `gpus` GPUs at one micro batch."""
    t = cfg.train
    n_params = count_params(cfg.model)
    v = value_bytes(t.precision)
    states = states_for_stage(cfg, n_params, gpus)
    grads = states.grads
    step_extra = 0.0
    if t.zero_stage in (1, 2) and not t.cpu_offload:
        partition = v * n_params / gpus
        fp32_copy = 0.0 if v == 4 else 4 * n_params / gpus
        if t.zero_stage == 2:
            grads = partition  # states.grads also holds the fp32 copy, which exists only in the step
            if _accumulates_in_fp32(cfg, gpus, accumulation):
                grads = 4 * n_params / gpus  # bf16 gradients summed in an fp32 partition
        step_extra = partition + fp32_copy
    buffers = _bucket_bytes(cfg, gpus)
    acts = activation_memory(cfg.model, micro_batch, precision=t.precision, flash=True)
    return PeakMemory(
        states=states.params + states.optimizer,
        grads=grads,
        buffers=buffers,
        activations=acts.peak(checkpointing),
        step_extra=step_extra,
        accumulation=accumulation,
    )
