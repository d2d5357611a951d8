"""Weight mapping to and from Hugging Face's GPT2LMHeadModel and GPTNeoForCausalLM: pure tensors, no
transformers import.

GPT-2: our names already match; GPT-2 only stores c_attn, c_proj and c_fc as Conv1D weights of shape
(in, out), the transpose of nn.Linear's (out, in). A dense model exports to it.

GPT-Neo (EleutherAI's GPT-3 replica) is where an alternating model goes: its layer pattern (global on
even layers, local on odd ones) and its local mask (query q sees keys q-window+1..q) are ours. It
differs in three ways that the mapping absorbs: separate nn.Linear q, k and v projections; no
1/sqrt(d_head) attention scaling, folded into the query weights; and no q, k or v biases. A key bias
adds the same q·b_k to every score of a query, so it cancels in the softmax; a value bias adds b_v to
every attention output (the weights sum to one), so it folds into the output projection's bias as
W_o b_v. A query bias has no such fold, hence ModelConfig.qkv_bias.

A model without some biases (bias=false, or qkv_bias=false when written as GPT-2) exports with zero
biases, which is exactly no bias; it imports back with those biases, zero until training moves them.

A μP model (ModelConfig.parametrization) exports as a standard one with its two multipliers folded into
weights: the attention scale sqrt(d_head_base)/d_head into the query weights and bias (as GPT-Neo's
missing 1/sqrt(d_head) is), and the output multiplier 1/m into the final LayerNorm's gain and offset,
whose output feeds only the tied readout (the readout itself cannot take it: it is the token embedding).
Hugging Face folders import as standard models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig

__all__ = [
    "Unmappable",
    "config_from_hf",
    "from_hf",
    "from_hf_state_dict",
    "gpt_neo_attention_types",
    "hf_config",
    "to_hf",
    "to_hf_state_dict",
]

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LINEAR_AND_NORMS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2", "ln_f")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # two spellings of GPT-2's tanh approximation, our MLP's
_PREFIX = "transformer."


class Unmappable(ValueError):
    """A model or HF config that scalegpt cannot represent (or export); the message says why and what to set."""


# ---------------------------------------------------------------------------------------------- export


def to_hf(
    config: ModelConfig, state: dict[str, Tensor], *, bos_token_id: int, eos_token_id: int
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json dict, state dict) for GPT2LMHeadModel when attention is dense, GPTNeoForCausalLM when
    alternating. The state dict holds fp32 tensors and no lm_head (tied to wte, transformers ties it)."""
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    if config.is_mup:
        state = _fold_mup(config, _with_zero_biases(state))
    if config.attention == "dense":
        return hf_config(config, bos_token_id=bos_token_id, eos_token_id=eos_token_id), to_hf_state_dict(state)
    return _gpt_neo_config(config, bos_token_id, eos_token_id), _to_gpt_neo_state_dict(config, state)


def _fold_mup(config: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The standard-parametrization weights that compute what μP's do (module docstring): queries times
    attn_scale * sqrt(d_head), so that the usual 1/sqrt(d_head) gives μP's scale, and the final LayerNorm
    times output_mult. In float64, then back to fp32, as the GPT-Neo fold does."""
    assert config.attn_scale is not None
    d, q_mult = config.d_model, config.attn_scale * math.sqrt(config.d_head)
    out = dict(state)
    for i in range(config.n_layer):
        for name in (f"{_PREFIX}h.{i}.attn.c_attn.weight", f"{_PREFIX}h.{i}.attn.c_attn.bias"):
            qkv = state[name].double().clone()
            qkv[:d] *= q_mult  # rows of q (nn.Linear is (out, in)), or the first third of the bias
            out[name] = qkv.float()
    for name in (f"{_PREFIX}ln_f.weight", f"{_PREFIX}ln_f.bias"):
        out[name] = (state[name].double() * config.output_mult).float()
    return out


def hf_config(
    config: ModelConfig, *, eos_token_id: int | None = None, bos_token_id: int | None = None
) -> dict[str, Any]:
    """config.json for transformers' GPT2LMHeadModel. Banded attention has no GPT-2 equivalent (it is
    GPT-Neo's, see to_hf). Both token ids default to the last one, as GPT-2's <|endoftext|> is."""
    if config.attention != "dense":
        raise Unmappable(
            "GPT-2 has no banded attention and this model alternates dense and local layers; "
            "export it as GPT-Neo (to_hf) or train with model.attention=dense"
        )
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
        "bos_token_id": eos if bos_token_id is None else bos_token_id,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def gpt_neo_attention_types(n_layer: int) -> list[list[Any]]:
    """GPT-Neo's run-length `attention_types` for global even layers and local odd ones: the pair
    repeated n_layer // 2 times, and one more global layer when n_layer is odd."""
    types: list[list[Any]] = [[["global", "local"], n_layer // 2]] if n_layer >= 2 else []
    return types + [[["global"], 1]] if n_layer % 2 else types


def _gpt_neo_config(config: ModelConfig, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.n_ctx,
        "hidden_size": config.d_model,
        "num_layers": config.n_layer,
        "num_heads": config.n_head,
        "intermediate_size": config.ffn_dim,
        "attention_types": gpt_neo_attention_types(config.n_layer),
        "window_size": config.local_window,
        "activation_function": "gelu_new",
        "resid_dropout": config.dropout,
        "embed_dropout": config.dropout,
        "attention_dropout": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _with_zero_biases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` plus a zero bias beside every Linear or LayerNorm weight that has none (bias=false,
    qkv_bias=false): HF's GPT-2 and GPT-Neo always have these biases, and a zero one is no bias."""
    out = dict(state)
    for name, tensor in state.items():
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and stem.endswith(_LINEAR_AND_NORMS) and stem + ".bias" not in state:
            out[stem + ".bias"] = tensor.new_zeros(tensor.shape[0])
    return out


def to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> GPT2LMHeadModel's (lm_head.weight is tied to wte and left to transformers);
    missing biases are written as zeros."""
    out: dict[str, Tensor] = {}
    for name, tensor in _with_zero_biases(state).items():
        out[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor.contiguous()
    return out


def _to_gpt_neo_state_dict(config: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    d = config.d_model
    out: dict[str, Tensor] = {}
    for name, tensor in _with_zero_biases(state).items():
        if ".attn." not in name:
            out[name] = tensor.contiguous()
    for i in range(config.n_layer):
        ours, theirs = f"{_PREFIX}h.{i}.attn.", f"{_PREFIX}h.{i}.attn.attention."
        w_q, w_k, w_v = state[ours + "c_attn.weight"].double().split(d)
        w_o, b_o = state[ours + "c_proj.weight"].double(), state.get(ours + "c_proj.bias")
        b_o = torch.zeros(d, dtype=torch.float64) if b_o is None else b_o.double()
        qkv_bias = state.get(ours + "c_attn.bias")
        if qkv_bias is not None:
            b_q, _, b_v = qkv_bias.double().split(d)  # the key bias cancels in the softmax
            if torch.any(b_q != 0):
                raise Unmappable(
                    f"GPT-Neo has no query bias and layer {i}'s ({ours}c_attn.bias[:{d}]) is nonzero, which no "
                    "other weight can absorb; train with model.qkv_bias=false (the gpt3-* presets' form)"
                )
            b_o = b_o + w_o @ b_v  # every attention output carries b_v, since the weights sum to one
        out[theirs + "q_proj.weight"] = (w_q / math.sqrt(config.d_head)).float()  # GPT-Neo does not scale
        out[theirs + "k_proj.weight"] = w_k.float().contiguous()
        out[theirs + "v_proj.weight"] = w_v.float().contiguous()
        out[theirs + "out_proj.weight"] = w_o.float()
        out[theirs + "out_proj.bias"] = b_o.float()
    return out


# ---------------------------------------------------------------------------------------------- import


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A config.json dict (model_type gpt2 or gpt_neo) -> our ModelConfig, or Unmappable naming the key
    that scalegpt cannot represent. Keys absent from the dict take transformers' defaults."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type == "gpt_neo":
        return _gpt_neo_config_from_hf(hf)
    raise Unmappable(
        f"config.json has model_type={model_type!r}; scalegpt reads GPT-2 ('gpt2') and GPT-Neo ('gpt_neo') models"
    )


def _refuse(hf: dict[str, Any], key: str, default: Any, allowed: tuple[Any, ...], why: str) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise Unmappable(f"config.json has {key}={value!r}: {why}")


def _d_ff(inner: Any, width: int) -> int:
    """0 (our 4 * d_model) for None or the default width, so a config read back compares equal."""
    return 0 if inner is None or inner == 4 * width else int(inner)


def _model_config(**fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise Unmappable(f"config.json describes no valid model: {exc}") from exc


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = "scalegpt's MLP uses GELU's tanh approximation (gelu_new)"
    _refuse(hf, "activation_function", "gelu_new", _TANH_GELU, act)
    _refuse(hf, "scale_attn_weights", True, (True,), "scalegpt always scales attention scores by 1/sqrt(d_head)")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", False, (False,), "scalegpt does not scale scores by layer")
    _refuse(hf, "reorder_and_upcast_attn", False, (False,), "scalegpt has no reordered, upcast attention")
    _refuse(hf, "add_cross_attention", False, (False,), "scalegpt is decoder-only, without cross-attention")
    _refuse(hf, "tie_word_embeddings", True, (True,), "scalegpt's output layer is the token embedding (tied)")
    d = int(hf.get("n_embd", 768))
    return _model_config(
        n_layer=int(hf.get("n_layer", 12)),
        n_head=int(hf.get("n_head", 12)),
        d_model=d,
        n_ctx=int(hf.get("n_positions", 1024)),
        vocab_size=int(hf.get("vocab_size", 50257)),
        d_ff=_d_ff(hf.get("n_inner"), d),
        dropout=float(hf.get("resid_pdrop", 0.1)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def _expand_attention_types(value: Any) -> list[str]:
    """GPT-Neo's run-length [[types, repeats], ...] as one type per layer, or Unmappable if malformed."""
    layers: list[str] = []
    try:
        for types, repeats in value:
            if not isinstance(repeats, int) or not all(isinstance(t, str) for t in types):
                raise TypeError
            layers.extend(list(types) * repeats)
    except (TypeError, ValueError) as exc:
        raise Unmappable(
            f"config.json has attention_types={value!r}, not a list of [[types...], repeats] pairs"
        ) from exc
    return layers


def _gpt_neo_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = "scalegpt's MLP uses GELU's tanh approximation (gelu_new)"
    _refuse(hf, "activation_function", "gelu_new", _TANH_GELU, act)
    _refuse(hf, "tie_word_embeddings", True, (True,), "scalegpt's output layer is the token embedding (tied)")
    n_layer = int(hf.get("num_layers", 24))
    types = hf.get("attention_types") or [[["global", "local"], 12]]
    layers = _expand_attention_types(types)
    if len(layers) != n_layer:
        raise Unmappable(f"config.json has attention_types={types!r}: {len(layers)} layers, but num_layers={n_layer}")
    if all(t == "global" for t in layers):
        attention = "dense"
    elif layers == ["global" if i % 2 == 0 else "local" for i in range(n_layer)]:
        attention = "alternating"
    else:
        raise Unmappable(
            f"config.json has attention_types={types!r} (layers {layers}); scalegpt's layers are all global, or "
            "alternate global (even layers) and local (odd layers)"
        )
    d = int(hf.get("hidden_size", 2048))
    return _model_config(
        n_layer=n_layer,
        n_head=int(hf.get("num_heads", 16)),
        d_model=d,
        n_ctx=int(hf.get("max_position_embeddings", 2048)),
        vocab_size=int(hf.get("vocab_size", 50257)),
        d_ff=_d_ff(hf.get("intermediate_size"), d),
        dropout=float(hf.get("resid_dropout", 0.0)),
        qkv_bias=False,
        attention=attention,
        local_window=int(hf.get("window_size", 256)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def _prefixed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every key with the `transformer.` prefix that transformers' state_dict() gives; the hub's gpt2
    files store theirs without it (`h.0.attn.c_attn.weight`, `wte.weight`). lm_head keeps its name."""
    return {k if k.startswith(_PREFIX) or k.startswith("lm_head.") else _PREFIX + k: v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT2LMHeadModel's state dict, keys with or without `transformer.` -> ours (drops lm_head and the
    causal-mask buffers that older checkpoints store)."""
    out: dict[str, Tensor] = {}
    for name, tensor in _prefixed(state).items():
        if not name.startswith(_PREFIX) or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
    return out


def _from_gpt_neo_state_dict(config: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPTNeoForCausalLM's state dict, keys prefixed -> ours (drops lm_head and stored mask buffers)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.startswith(_PREFIX) and ".attn.attention." not in name:
            out[name] = tensor
    for i in range(config.n_layer):
        theirs, ours = f"{_PREFIX}h.{i}.attn.attention.", f"{_PREFIX}h.{i}.attn."
        try:
            q, k, v, w_o, b_o = (
                state[theirs + n]
                for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "out_proj.bias")
            )
        except KeyError as exc:
            raise Unmappable(f"the GPT-Neo weights have no {exc.args[0]}") from exc
        q = (q.double() * math.sqrt(config.d_head)).float()  # our attention scales scores by 1/sqrt(d_head)
        out[ours + "c_attn.weight"] = torch.cat([q, k.float(), v.float()])
        out[ours + "c_proj.weight"] = w_o
        out[ours + "c_proj.bias"] = b_o
    return out


def from_hf(hf: dict[str, Any], state: dict[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A config.json dict and its state dict (keys with the `transformer.` prefix, as transformers'
    model.state_dict() gives, OR without it, as the hub's gpt2 files store them: `h.0.attn.c_attn.weight`,
    `wte.weight`) -> (our config, a state dict that GPT(config).load_state_dict(strict=True) accepts).
    The tensors come back in fp32; Unmappable names what does not fit."""
    config = config_from_hf(hf)
    prefixed = _prefixed(state)
    head, wte = prefixed.get("lm_head.weight"), prefixed.get(_PREFIX + "wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise Unmappable("lm_head.weight differs from transformer.wte.weight; scalegpt's output layer is tied to wte")
    if hf.get("model_type") == "gpt_neo":
        ours = _from_gpt_neo_state_dict(config, prefixed)
    else:
        ours = from_hf_state_dict(prefixed)
    ours = {k: v.float() for k, v in ours.items()}
    _check_keys(config, ours)
    return config, ours


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .gpt import GPT  # torch only; the meta device allocates nothing

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}


def _check_keys(config: ModelConfig, state: dict[str, Tensor]) -> None:
    expected = _expected_shapes(config)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which scalegpt's model does not"
        extra = len(missing) + len(unexpected) - 1
        raise Unmappable(
            f"the weights do not fit their config.json: the state dict {what}"
            + (f" ({extra} more keys differ)" if extra else "")
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise Unmappable(
                f"the weights do not fit their config.json: {name} has shape {tuple(state[name].shape)}, "
                f"config.json implies {shape}"
            )
