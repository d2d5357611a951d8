"""The attention kernels: one pure function picks them, and every kernel agrees with attention written
out by hand, forward and (where the kernel has one on CPU) backward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from scalegpt.model import GPT, KVCache, ModelConfig
from scalegpt.model.attention import (
    ATTN_IMPLS,
    attend,
    attention_mask,
    band_block_mask,
    choose_kernel,
    flex_attention,
)

T, WINDOW = 96, 24  # the window is well inside the sequence, so a kernel that ignores the band fails


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, start: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, with the mask built from positions by hand."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(start, start + q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def qkv(tq: int = T, tk: int = T, *, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, tq, 16, generator=g)
    k, v = (torch.randn(2, 3, tk, 16, generator=g) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize(
    ("kernel", "window"), [("sdpa_causal", None), ("sdpa_mask", None), ("sdpa_mask", WINDOW), ("sdpa_mask", 1)]
)
def test_sdpa_kernels_equal_reference_forward_and_backward(kernel: str, window: int | None) -> None:
    inputs = qkv(grad=True)
    got = attend(kernel, *inputs, window=window)  # type: ignore[arg-type]
    want = reference(*inputs, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_decoding_kernels_equal_reference_at_an_offset(window: int | None) -> None:
    """A KV-cache step: new queries at positions 40.., keys at 0..; one token and several."""
    for new in (1, 5):
        q, k, v = qkv(new, 40 + new)
        kernel = choose_kernel(device_type="cpu", compiled=False, window=window, cached=True, new_tokens=new)
        got = attend(kernel, q, k, v, window=window, start=40)
        torch.testing.assert_close(got, reference(q, k, v, window, start=40), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # inductor builds C++ kernels: about a minute on a busy CPU
@pytest.mark.skipif(flex_attention is None, reason="this torch has no flex_attention")
def test_compiled_flex_equals_reference_in_inference() -> None:
    """The flex kernel as it runs on a GPU: compiled. torch compiles flex on CPU for inference only, so
    this checks the forward pass and the band's block mask; it needs a C++ compiler (inductor)."""
    compiled = torch.compile(flex_attention)
    q, k, v = qkv()
    with torch.no_grad():
        got = compiled(q, k, v, block_mask=band_block_mask(WINDOW, T, q.device))
    torch.testing.assert_close(got, reference(q, k, v, WINDOW), atol=1e-5, rtol=1e-5)


def test_mask_is_causal_and_banded() -> None:
    pos = torch.arange(6)
    band = attention_mask(pos, pos, 2)
    assert band.tolist()[4] == [False, False, False, True, True, False]
    assert attention_mask(pos, pos, None).tolist()[4] == [True] * 5 + [False]


def test_kernel_choice_rules() -> None:
    def pick(**kw: object) -> str:
        return choose_kernel(**{"device_type": "cuda", "compiled": False, "window": WINDOW, **kw})  # type: ignore[arg-type]

    assert pick(window=None) == "sdpa_causal"
    assert pick(window=None, compiled=True) == "sdpa_causal"
    assert pick() == "sdpa_mask"  # banded and not compiled: SDPA, even on CUDA
    assert pick(compiled=True) == "flex"
    assert pick(compiled=True, attn_impl="flex") == "flex"
    assert pick(compiled=True, attn_impl="sdpa") == "sdpa_mask"
    assert pick(compiled=True, device_type="cpu") == "sdpa_mask"  # no flex backward on CPU
    assert pick(compiled=True, dropout=True) == "sdpa_mask"  # flex has no dropout
    assert pick(compiled=True, flex_available=False) == "sdpa_mask"
    assert pick(compiled=True, cached=True, new_tokens=1) == "sdpa_mask"
    assert pick(window=None, cached=True, new_tokens=1) == "sdpa_full"
    assert pick(window=None, cached=True, new_tokens=3) == "sdpa_mask"
    with pytest.raises(ValueError, match="attn_impl"):
        pick(attn_impl="triton")


def test_choice_is_pure_and_never_eager_flex() -> None:
    """Over every input, the answer depends on the inputs alone (asked twice, in two orders), and flex
    comes only with compile=True on CUDA."""
    space = list(
        itertools.product(
            ("cpu", "cuda", "mps"), (False, True), (None, 1, WINDOW), ATTN_IMPLS, (False, True), (1, 7), (False, True)
        )
    )

    def answers(order: list[tuple]) -> dict[tuple, str]:
        return {
            args: choose_kernel(
                device_type=args[0],
                compiled=args[1],
                window=args[2],
                attn_impl=args[3],
                cached=args[4],
                new_tokens=args[5],
                dropout=args[6],
            )
            for args in order
        }

    first = answers(space)
    assert answers(space[::-1]) == first
    flex = [args for args, kernel in first.items() if kernel == "flex"]
    assert flex and all(args[0] == "cuda" and args[1] and args[2] is not None for args in flex)


def _alternating(**kw: object) -> ModelConfig:
    return ModelConfig(
        n_layer=4, n_head=2, d_model=32, n_ctx=T, vocab_size=64, attention="alternating", local_window=WINDOW, **kw
    )  # type: ignore[arg-type]


def test_model_marked_compiled_but_run_eagerly_uses_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT.compiled reaches every attention layer, and flex needs a trace in progress as well, so a
    model marked compiled but called eagerly on CUDA never runs eager flex."""
    model = GPT(_alternating())
    attn = model.transformer.h[1].attn
    assert not model.compiled and attn.kernel("cuda", cached=False, new_tokens=T) == "sdpa_mask"
    model.compiled = True
    assert model.compiled and all(b.attn.compiled for b in model.transformer.h)
    assert attn.kernel("cuda", cached=False, new_tokens=T) == "sdpa_mask"  # not being traced
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attn.kernel("cuda", cached=False, new_tokens=T) == "flex"
    assert attn.kernel("cpu", cached=False, new_tokens=T) == "sdpa_mask"
    assert model.transformer.h[0].attn.kernel("cuda", cached=False, new_tokens=T) == "sdpa_causal"


def test_old_attn_impl_values_load_and_give_the_same_model() -> None:
    idx = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))
    outs = []
    for impl in ATTN_IMPLS:
        torch.manual_seed(0)
        outs.append(GPT(_alternating(attn_impl=impl)).eval()(idx)[0])
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
    torch.manual_seed(0)
    dense = GPT(ModelConfig(**{**_alternating().__dict__, "attention": "dense"})).eval()(idx)[0]
    assert not torch.allclose(dense, outs[0], atol=1e-3)  # the band changes the result


def test_cached_decoding_equals_full_forward_in_banded_layers() -> None:
    torch.manual_seed(0)
    model = GPT(_alternating()).eval()
    idx = torch.randint(0, 64, (2, 60))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.empty(model.config, 2, device="cpu", dtype=torch.float32)
        parts = [model(idx[:, :30], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(30, 60)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
