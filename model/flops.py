"""Parameter and FLOP arithmetic for the GPT of gpt.py, and MFU: plain Python on a ModelConfig.

Everything here is closed-form, so `scalegpt plan` can size a 175B run on a laptop and the training
loop can report MFU without touching the model. The memory model (ZeRO model states, activations)
is the planner's alone and lives beside it, in launch/memory.py. Sources, by quantity:

- parameters: the module layout of gpt.py (checked against ``GPT(config).num_params()`` in tests);
- training FLOPs: Kaplan et al. 2020 (6N per token) plus PaLM's attention term (Chowdhery et al. 2022,
  Appendix B), the estimate nanoGPT's ``estimate_mfu`` also uses;
- the loss' chunking: model/loss.py, whose chunk sizes loss_chunks sets.
"""

from __future__ import annotations

import re

from .config import ModelConfig


def count_params(config: ModelConfig, *, non_embedding: bool = False) -> int:
    """Parameters of ``GPT(config)``, counted from the layer shapes; the output layer is tied to wte and
    so adds nothing. ``non_embedding`` drops only the position embedding (wpe), as nanoGPT does: wte
    stays because, tied, it is also the output layer's matmul and costs FLOPs every token."""
    d, f, bias = config.d_model, config.ffn_dim, int(config.bias)
    qkv_bias = int(config.bias and config.qkv_bias)
    attention = 4 * d * d + qkv_bias * 3 * d + bias * d  # c_attn (d -> 3d) and c_proj (d -> d)
    mlp = 2 * d * f + bias * (f + d)  # c_fc (d -> f) and c_proj (f -> d)
    norms = 2 * d * (1 + bias)  # ln_1 and ln_2: gain, and offset when bias
    block = attention + mlp + norms
    total = config.vocab_size * d + config.n_layer * block + d * (1 + bias)  # wte, blocks, ln_f
    return total if non_embedding else total + config.n_ctx * d


def flops_per_token(config: ModelConfig, *, banded_attention: bool = False) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (2 forward + 4 backward per parameter,
    Kaplan et al. 2020, Section 2.1) plus 12·L·d·T for attention scores and their weighted sum (PaLM,
    Appendix B), N the non-embedding parameters. Like PaLM it counts full (not causal-halved)
    attention, and no activation recompute: these are *model* FLOPs, the numerator of MFU.

    GPT-3's banded layers attend to ``local_window`` keys, not n_ctx; the default counts them as dense,
    which is the convention the public MFU figures use. ``banded_attention=True`` counts the banded
    layers with their window instead, the work those layers really do."""
    n = count_params(config, non_embedding=True)
    if not banded_attention or config.attention != "alternating":
        return 6.0 * n + 12.0 * config.n_layer * config.d_model * config.n_ctx
    banded = config.n_layer // 2  # the odd layers (gpt.is_local_layer)
    dense = config.n_layer - banded
    window = min(config.local_window, config.n_ctx)
    return 6.0 * n + 12.0 * config.d_model * (dense * config.n_ctx + banded * window)


def mfu(tokens_per_sec: float, config: ModelConfig, peak_flops: float) -> float:
    """Model FLOPs utilization (PaLM, Appendix B): achieved model FLOP/s over the hardware's peak.
    ``peak_flops`` is for all the devices that produced ``tokens_per_sec`` together."""
    return tokens_per_sec * flops_per_token(config) / peak_flops


PEAK_FLOPS: dict[str, float] = {
    "H100": 989e12,  # SXM / HBM3 (NVIDIA H100 datasheet: 1,979 TFLOPS with 2:4 sparsity, halved)
    "H100 PCIe": 756e12,
    "H200": 989e12,  # same compute as H100 SXM
    "GH200": 989e12,
    "A100": 312e12,  # SXM and PCIe alike
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}
"""Dense (no sparsity) 16-bit tensor-core peak FLOP/s per GPU, from NVIDIA's datasheets; bf16 and fp16
are the same on these parts."""

PEAK_FLOPS_FP32: dict[str, float] = {
    "H100": 67e12,
    "H100 PCIe": 51e12,
    "H200": 67e12,
    "GH200": 67e12,
    "A100": 19.5e12,
    "L40S": 91.6e12,
    "L4": 30.3e12,
    "A10": 31.2e12,
}
"""Plain FP32 (CUDA-core) peak: PyTorch runs fp32 matmuls without TF32 unless told to, so this is the
honest denominator for an fp32 run; with TF32 enabled it makes MFU read high."""

# Most specific first: "NVIDIA GH200 480GB" must not read as H200, "NVIDIA A10G" must not read as A10.
_DEVICE_PATTERNS: tuple[tuple[str, str | None], ...] = (
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bNVL\b", None),  # neither SXM nor PCIe figures; unknown rather than wrong
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b", "H100"),
    (r"\bA100\b", "A100"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10\b", "A10"),
)


def peak_flops_for(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one device for a training precision, from ``torch.cuda.get_device_name()``
    (e.g. "NVIDIA H100 80GB HBM3"); None when unknown (a CPU, a GPU not in the table), so MFU is
    left out rather than made up."""
    name = device_name.upper()
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, name):
            if key is None:
                return None
            return PEAK_FLOPS_FP32[key] if precision == "fp32" else PEAK_FLOPS[key]
    return None


LOSS_CHUNK_ELEMENTS = 2**24
"""Logits that model/loss.py materializes at once (64 MiB in fp32): its forward pass takes this many
over chunks of rows, its backward pass over slices of the vocabulary. Large enough that each chunk
is a full-size matmul on a GPU, small enough that the loss stays below one block's activations."""


def loss_chunks(rows: int, vocab: int) -> tuple[int, int]:
    """(rows per forward chunk, vocabulary entries per backward slice) of the chunked loss over
    `rows` positions: each chunk or slice holds about LOSS_CHUNK_ELEMENTS logits."""
    return max(1, LOSS_CHUNK_ELEMENTS // vocab), max(1, LOSS_CHUNK_ELEMENTS // max(1, rows))
