"""Weight mapping to and from Hugging Face's GPT2LMHeadModel: pure tensors, no transformers import.

Our names already match GPT-2's; the only difference is that GPT-2 stores c_attn, c_proj and c_fc
as Conv1D weights of shape (in, out), the transpose of nn.Linear's (out, in).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .config import ModelConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(config: ModelConfig, *, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json for transformers' GPT2LMHeadModel. Banded attention has no GPT-2 equivalent."""
    if config.attention != "dense":
        raise ValueError("only dense-attention models map to GPT-2; this one uses alternating local attention")
    if not config.bias:
        raise ValueError("GPT-2 has biases everywhere; a model built with bias=false does not map to it")
    eos = config.vocab_size - 1 if eos_token_id is None else eos_token_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.ffn_dim,
        "activation_function": "gelu_new",  # GPT-2's tanh approximation, as in our MLP
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> GPT2LMHeadModel's (lm_head.weight is tied to wte and left to transformers)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        out[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor.contiguous()
    return out


def from_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT2LMHeadModel's state dict -> ours (drops lm_head, the causal-mask buffers and rotary leftovers)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith("transformer.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
    return out
