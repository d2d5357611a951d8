"""model/hf.py against transformers: GPT-Neo export of alternating models (logits and greedy decoding),
GPT-Neo's local mask and layer pattern against ours, round trips through GPT-2 and GPT-Neo, imports of
the hub's layouts, and every config or weight that scalegpt refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scalegpt.model import GPT, ModelConfig
from scalegpt.model.attention import attention_mask
from scalegpt.model.generate import generate
from scalegpt.model.gpt import is_local_layer
from scalegpt.model.hf import Unmappable, config_from_hf, from_hf, hf_config, to_hf

transformers = pytest.importorskip("transformers")

# local_window < n_ctx, so that a window bug changes the logits
ALTERNATING = dict(n_head=2, d_model=32, n_ctx=32, vocab_size=61, attention="alternating", local_window=8)
EOT = 60


def varied(config: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every parameter (biases, LayerNorm offsets) is far from its init, so a dropped or
    misplaced tensor shows in the logits; a query bias, if any, is zero (GPT-Neo has no place for one)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if config.bias and config.qkv_bias:
            for block in model.transformer.h:
                block.attn.c_attn.bias[: config.d_model] = 0
    return model


def hf_model(hf: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' model for a to_hf result, holding exactly its weights (lm_head tied to wte)."""
    config = transformers.AutoConfig.for_model(**hf)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []
    assert type(model).__name__ == hf["architectures"][0]
    return model


def tokens(config: ModelConfig, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (rows, config.n_ctx), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "fields",
    [dict(n_layer=3, qkv_bias=False), dict(n_layer=4, qkv_bias=True)],
    ids=["no-qkv-bias-odd-layers", "k-and-v-biases-folded"],
)
def test_gpt_neo_export_equals_ours(fields: dict) -> None:
    config = ModelConfig(**ALTERNATING, **fields)
    ours = varied(config)
    hf, state = to_hf(config, ours.state_dict(), bos_token_id=EOT, eos_token_id=EOT)
    assert hf["model_type"] == "gpt_neo" and hf["window_size"] == 8 and hf["max_position_embeddings"] == 32
    assert hf["bos_token_id"] == hf["eos_token_id"] == EOT and hf["tie_word_embeddings"] is True
    if config.n_layer % 2:
        assert hf["attention_types"] == [[["global", "local"], 1], [["global"], 1]]
    theirs = hf_model(hf, state)
    x = tokens(config)  # 32 tokens through a window of 8
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-5, rtol=0)
    prompt = [[EOT, 3, 4], [EOT, 5, 6]]
    n_new = config.n_ctx - 3
    with torch.no_grad():
        x = torch.tensor(prompt)
        out = theirs.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new, eos_token_id=None
        )
    assert out[:, 3:].tolist() == generate(ours, prompt, max_new_tokens=n_new, temperature=0)


def test_gpt_neo_local_mask_and_layer_pattern_are_ours() -> None:
    """transformers builds each GPT-Neo layer's mask from attention_types and window_size; for the
    config we write, it is attention_mask of our layer's band, layer by layer."""
    config = ModelConfig(**{**ALTERNATING, "n_layer": 5})
    hf, state = to_hf(config, GPT(config).state_dict(), bos_token_id=EOT, eos_token_id=EOT)
    theirs = hf_model(hf, state)
    pos = torch.arange(config.n_ctx)
    for i, block in enumerate(theirs.transformer.h):
        local = is_local_layer(config, i)
        assert block.attn.attention_type == ("local" if local else "global")
        ours = attention_mask(pos, pos, config.local_window if local else None)
        assert torch.equal(block.attn.attention.bias[0, 0, : config.n_ctx, : config.n_ctx], ours), i
    assert theirs.config.attention_layers == ["global", "local", "global", "local", "global"]


@pytest.mark.parametrize(
    ("fields", "imported"),
    [
        (dict(n_layer=2, n_head=6, d_model=48, n_ctx=24, vocab_size=61), dict(model_type="gpt2", qkv_bias=True)),
        (dict(n_layer=2, n_ctx=24, vocab_size=61, qkv_bias=False, d_ff=40), dict(model_type="gpt2", qkv_bias=True)),
        (dict(**{**ALTERNATING, "n_head": 4}, n_layer=3), dict(model_type="gpt_neo", qkv_bias=False)),
        (dict(**ALTERNATING, n_layer=2, bias=False), dict(model_type="gpt_neo", qkv_bias=False)),
    ],
    ids=["gpt2", "gpt2-no-qkv-bias", "gpt-neo-qkv-bias", "gpt-neo-no-bias"],
)
def test_round_trip_through_transformers(fields: dict, imported: dict) -> None:
    """scalegpt -> HF -> scalegpt: the same logits within 1e-5 (not bit-exact: the 1/sqrt(d_head) folded
    into GPT-Neo's query rounds when d_head is not a power of 4, here 8). Missing biases travel as
    zeros and come back as (zero) biases."""
    config = ModelConfig(**fields)
    ours = varied(config)
    hf, state = to_hf(config, ours.state_dict(), bos_token_id=EOT, eos_token_id=EOT)
    assert hf["model_type"] == imported["model_type"]
    theirs = hf_model(hf, state)
    back_config, back_state = from_hf(theirs.config.to_dict(), theirs.state_dict())
    assert back_config == dataclasses.replace(config, bias=True, qkv_bias=imported["qkv_bias"])
    back = GPT(back_config).eval()
    back.load_state_dict(back_state, strict=True)
    x = tokens(config)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ours(x)[0], atol=1e-5, rtol=0)


def test_gpt2_in_the_hubs_layout_imports() -> None:
    """The hub's gpt2 files store keys without `transformer.`, keep the causal-mask buffer (h.N.attn.bias)
    and leave n_inner unset; dropout comes from resid_pdrop."""
    hf_config_ = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=61)
    theirs = transformers.GPT2LMHeadModel(hf_config_).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hub = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if not k.startswith("lm_head")}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(24, 24, dtype=torch.bool))[None, None]
    assert "h.0.attn.c_attn.weight" in hub and "wte.weight" in hub
    config, state = from_hf(hf_config_.to_dict(), hub)
    assert config.d_ff == 0 and config.dropout == hf_config_.resid_pdrop and config.n_ctx == 24
    ours = GPT(config).eval()
    ours.load_state_dict(state, strict=True)
    x = tokens(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("types", "attention"),
    [([[["global", "local"], 1], [["global"], 1]], "alternating"), ([[["global"], 3]], "dense")],
)
def test_gpt_neo_imports(types: list, attention: str) -> None:
    hf_config_ = transformers.GPTNeoConfig(
        num_layers=3,
        attention_types=types,
        window_size=8,
        max_position_embeddings=32,
        hidden_size=32,
        num_heads=4,
        vocab_size=61,
        resid_dropout=0.1,
    )
    theirs = transformers.GPTNeoForCausalLM(hf_config_).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config, state = from_hf(hf_config_.to_dict(), theirs.state_dict())
    assert (config.attention, config.local_window, config.qkv_bias, config.dropout) == (attention, 8, False, 0.1)
    ours = GPT(config).eval()
    ours.load_state_dict(state, strict=True)
    x = tokens(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).logits, atol=1e-5, rtol=0)


GPT2 = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=61).to_dict()
NEO = transformers.GPTNeoConfig(
    num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=32, num_heads=2, vocab_size=61
).to_dict()


@pytest.mark.parametrize(
    ("base", "key", "value"),
    [
        (GPT2, "activation_function", "relu"),
        (GPT2, "scale_attn_by_inverse_layer_idx", True),
        (GPT2, "reorder_and_upcast_attn", True),
        (GPT2, "scale_attn_weights", False),
        (GPT2, "add_cross_attention", True),
        (GPT2, "tie_word_embeddings", False),
        (NEO, "activation_function", "gelu"),
        (NEO, "tie_word_embeddings", False),
        (NEO, "attention_types", [[["local", "global"], 1]]),
        (NEO, "attention_types", [[["global"], 1], [["global", "local"], 1]]),
        (NEO, "attention_types", [[["global", "local"], 2]]),  # 4 layers for num_layers=2
        (NEO, "attention_types", "global"),
        (GPT2, "model_type", "llama"),
        (GPT2, "n_head", 5),  # 32 is not divisible by 5
    ],
)
def test_unmappable_configs_name_their_key(base: dict, key: str, value: object) -> None:
    with pytest.raises(Unmappable, match=key) as err:
        config_from_hf({**base, key: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_an_untied_head_is_refused() -> None:
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    state = dict(theirs.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1
    with pytest.raises(Unmappable, match="lm_head.weight"):
        from_hf(GPT2, state)
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    with pytest.raises(Unmappable, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        from_hf(GPT2, state)


def test_a_query_bias_cannot_become_gpt_neo() -> None:
    config = ModelConfig(**ALTERNATING, n_layer=2)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.bias[0] = 0.5
    with pytest.raises(Unmappable, match=r"model\.qkv_bias=false") as err:
        to_hf(config, model.state_dict(), bos_token_id=EOT, eos_token_id=EOT)
    assert "transformer.h.1.attn.c_attn.bias" in str(err.value)
    with pytest.raises(Unmappable, match="model.attention=dense"):
        hf_config(config)


class _Scripted(torch.nn.Module):
    """Stands in for a transformers model whose greedy decoding is `tokens`."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__()
        self.tokens = tokens

    def generate(self, prompt: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.tensor([prompt[0].tolist() + self.tokens])


def test_export_tells_a_near_tie_from_a_mismatch() -> None:
    """Greedy decoding may part at two equal logits; anywhere else a different token fails the export."""
    from scalegpt.train.errors import UserError
    from scalegpt.train.export import _greedy_agreement

    config = ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=16, vocab_size=61)
    model, prompt = varied(config), [EOT, 1]
    ours = generate(model, [prompt], max_new_tokens=14, temperature=0)[0]
    assert _greedy_agreement(model, _Scripted(ours), prompt) == (14, 14, None)
    a = ours[3]
    twin = next(t for t in range(a + 1, 60) if t not in prompt + ours[:3])  # argmax keeps the first of equals
    with torch.no_grad():
        model.transformer.wte.weight[twin] = model.transformer.wte.weight[a]  # the same logit as `a`, always
    assert generate(model, [prompt], max_new_tokens=4, temperature=0)[0] == ours[:4]
    assert _greedy_agreement(model, _Scripted([*ours[:3], twin, *ours[4:]]), prompt) == (3, 14, 0.0)
    other = next(t for t in range(60) if t not in (a, twin))
    with pytest.raises(UserError, match="differs from ours at new token 4 of 14"):
        _greedy_agreement(model, _Scripted([*ours[:3], other, *ours[4:]]), prompt)
