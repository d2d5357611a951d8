"""The GPT of GPT3.md: equal to Hugging Face's GPT-2, banded attention, init, presets, learning."""

from __future__ import annotations

import ast
import hashlib
import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

import scalegpt.model.flops
from scalegpt.model import GPT, ModelConfig, build_model
from scalegpt.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict

from conftest import CONFIGS, ROOT

TINY = dict(n_layer=2, n_head=2, d_model=32, n_ctx=16, vocab_size=50)

# Table 2.1's printed parameter counts.
TABLE_2_1 = {
    "small": 125e6,
    "medium": 350e6,
    "large": 760e6,
    "xl": 1.3e9,
    "2.7b": 2.7e9,
    "6.7b": 6.7e9,
    "13b": 13.0e9,
    "175b": 175.0e9,
}


@pytest.mark.parametrize("shape", [TINY, dict(n_layer=3, n_head=4, d_model=64, n_ctx=32, vocab_size=97)])
def test_logits_equal_transformers_gpt2(shape: dict) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(**shape)
    ours = GPT(cfg).eval()
    for p in ours.parameters():  # non-trivial biases and LayerNorm gains, so a missed mapping shows
        p.data.add_(0.05 * torch.randn_like(p))
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(cfg))).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # lm_head is tied to wte in both
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.n_ctx))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=0)
    back = GPT(cfg)
    back.load_state_dict(from_hf_state_dict(theirs.state_dict()))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_local_layers_see_only_the_band() -> None:
    """Changing a token more than `window` positions back cannot reach a position through banded layers
    alone: with one (banded) layer pair... we test the layer directly."""
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, n_ctx=32, vocab_size=20, attention="alternating", local_window=4)
    attn = GPT(cfg).transformer.h[1].attn.eval()
    assert attn.window == 4 and GPT(cfg).transformer.h[0].attn.window is None
    x = torch.randn(1, 32, 16)
    y = x.clone()
    y[0, 3] += 1.0
    with torch.no_grad():
        a, b = attn(x), attn(y)
    assert torch.allclose(a[0, 8:], b[0, 8:])  # positions >= 3 + 4 + 1 cannot see position 3
    assert not torch.allclose(a[0, 3:7], b[0, 3:7])


def test_gpt2_initialization() -> None:
    cfg = ModelConfig(n_layer=8, n_head=4, d_model=256, n_ctx=64, vocab_size=1000)
    model = build_model(cfg, seed=0)
    h0 = model.transformer.h[0]
    assert abs(h0.attn.c_attn.weight.std().item() - 0.02) < 0.002
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(h0.attn.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert abs(h0.mlp.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert torch.all(h0.attn.c_attn.bias == 0) and torch.all(h0.ln_1.weight == 1)
    assert torch.equal(build_model(cfg, seed=0).transformer.wte.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("name", sorted(TABLE_2_1))
def test_presets_on_meta_device_match_table_2_1(name: str) -> None:
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"gpt3-{name}.yaml")))
    with torch.device("meta"):
        model = GPT(cfg)  # 175B parameters, no memory
    assert all(p.is_meta for p in model.parameters())
    assert abs(model.num_params() / TABLE_2_1[name] - 1) < 0.02


def test_meta_build_materializes_with_tied_output() -> None:
    model = build_model(ModelConfig(**TINY), seed=1)
    assert not any(p.is_meta for p in model.parameters())
    x = torch.randint(0, 50, (2, 16))
    logits, loss = model(x)
    assert logits is not None and logits.shape == (2, 16, 50) and loss is None
    logits, loss = model(x, torch.randint(0, 50, (2, 16)))
    assert logits is None and loss is not None and math.isfinite(loss.item())  # training keeps no logits
    assert abs(loss.item() - math.log(50)) < 0.5  # near-uniform predictions at init


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (4, 17))
    first = None
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 3.5 and loss.item() < 0.1


def test_activation_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    a = GPT(ModelConfig(**TINY))
    b = GPT(ModelConfig(**TINY))
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing = True
    x = torch.randint(0, 50, (2, 17))
    for m in (a, b):
        m(x[:, :-1], x[:, 1:])[1].backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_model_package_is_pure_pytorch() -> None:
    forbidden = ("deepspeed", "omegaconf", "wandb", "torch.distributed", "scalegpt.train", "scalegpt.launch")
    for path in (ROOT / "model").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert not name.startswith(forbidden) and not name.startswith(".."), f"{path.name} imports {name}"


def test_bad_model_config_raises() -> None:
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(n_head=5, d_model=32)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="sparse")


def _unchunked_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference loss: the whole micro batch's fp32 logits, then F.cross_entropy."""
    t = model.transformer
    h = t.ln_f(_body(model, x))
    logits = torch.nn.functional.linear(h, t.wte.weight)
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


def _body(model: GPT, x: torch.Tensor) -> torch.Tensor:
    t = model.transformer
    h = t.drop(t.wte(x) + t.wpe(torch.arange(x.size(1))))
    for block in t.h:
        h = block(h)
    return h


def test_tiny_loss_is_the_recorded_one() -> None:
    """The loss of a fixed model and batch, as the whole-logits cross-entropy gave it (torch 2.13,
    CPU), to fp32 rounding."""
    model = build_model(ModelConfig(**TINY), seed=0)
    torch.manual_seed(1)
    x = torch.randint(0, 50, (3, 17))
    loss = model(x[:, :-1], x[:, 1:])[1]
    assert loss.item() == pytest.approx(3.8856022357940674, rel=1e-6, abs=0)


@pytest.mark.parametrize("chunk", [2**24, 700, 97, 1], ids=["one-chunk", "chunks", "ragged", "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_unchunked(chunk: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and every gradient equal the whole-logits cross-entropy: to fp32 rounding in fp32, to bf16
    rounding in bf16, for any chunking, with ignored (-1) targets in the batch."""
    monkeypatch.setattr(scalegpt.model.flops, "LOSS_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    a = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=24, vocab_size=61)).to(dtype)
    b = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=24, vocab_size=61)).to(dtype)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 61, (3, 25))
    y = x[:, 1:].clone()
    y[0, :5] = -1
    ours, theirs = a(x[:, :-1], y)[1], _unchunked_loss(b, x[:, :-1], y)
    ours.backward()
    theirs.backward()
    fp32 = dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-6 if fp32 else 1e-2, atol=0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        tol = dict(rtol=1e-4, atol=1e-6) if fp32 else dict(rtol=5e-2, atol=2e-3)
        torch.testing.assert_close(pa.grad.float(), pb.grad.float(), msg=name, **tol)


def _state_hash(model: GPT) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _reference_init(model: GPT, seed: int) -> None:
    """GPT-2 initialization drawn on the host: each weight into a fresh fp32 CPU tensor, from one
    CPU generator, in module order, then copied in."""
    gen = torch.Generator().manual_seed(seed)
    resid = 0.02 / math.sqrt(2 * model.config.n_layer)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                std = resid if name.endswith("c_proj") else 0.02
                module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, std, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()


# sha256 of the state dicts that the host-side initialization draws (torch 2.13, CPU): a change of
# the reference above, or of torch's CPU normal_, shows here.
RECORDED_INIT = {
    "tiny": "e9074aa08b9f371ee25dc74695632b614d3cda985dfe564cf3a7f3d387fcfc90",
    "alternating-nobias": "7af4bb0c02ec92a75399e909efdcd1a413ab62179e1477a9d5adc3a00b252672",
}
INIT_CONFIGS = {
    "tiny": (ModelConfig(**TINY), 0),
    "alternating-nobias": (
        ModelConfig(
            n_layer=3, n_head=4, d_model=64, n_ctx=32, vocab_size=97, attention="alternating", bias=False, d_ff=100
        ),
        1234,
    ),
}


@pytest.mark.parametrize("name", sorted(INIT_CONFIGS))
def test_cpu_initialization_is_bit_for_bit_the_earlier_one(name: str) -> None:
    config, seed = INIT_CONFIGS[name]
    model = build_model(config, seed=seed)  # meta, then drawn in place on the CPU
    reference = GPT(config)
    _reference_init(reference, seed)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[key]), key
    assert _state_hash(model) == RECORDED_INIT[name]


def test_qkv_bias_only_removes_the_attention_input_biases() -> None:
    """qkv_bias=false drops c_attn's bias and nothing else: the other biases stay, and every weight is
    the draw the same seed gives with q/k/v biases (biases are zeroed, not drawn)."""
    config = ModelConfig(**TINY)
    with_bias, without = build_model(config, seed=3), build_model(replace(config, qkv_bias=False), seed=3)
    assert without.transformer.h[0].attn.c_attn.bias is None
    assert without.transformer.h[0].attn.c_proj.bias is not None and without.transformer.h[0].mlp.c_fc.bias is not None
    dropped = {k for k in with_bias.state_dict() if k.endswith("attn.c_attn.bias")}
    assert len(dropped) == config.n_layer and with_bias.state_dict().keys() - dropped == without.state_dict().keys()
    for key, tensor in without.state_dict().items():
        assert torch.equal(tensor, with_bias.state_dict()[key]), key
    assert GPT(ModelConfig(**TINY, bias=False, qkv_bias=True)).transformer.h[0].attn.c_attn.bias is None


def test_initialization_apart_from_construction() -> None:
    """A meta model draws nothing; init_weights materializes it on the device it is given, and the
    same seed gives the same weights however often, and whatever else used the global generator."""
    with torch.device("meta"):
        model = GPT(ModelConfig(**TINY))
    assert all(p.is_meta for p in model.parameters())
    model.init_weights(7, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    torch.rand(100)  # the global generator moves; a seeded init does not care
    again = build_model(ModelConfig(**TINY), seed=7)
    assert _state_hash(model) == _state_hash(again)
    assert _state_hash(again) != _state_hash(build_model(ModelConfig(**TINY), seed=8))
