"""Attention kernels, and the one function that picks among them.

``choose_kernel`` is a pure function of (device type, compiled or not, the layer's band, the config's
``attn_impl``, whether a KV cache is read); ``CausalSelfAttention`` only calls it and runs the answer
through ``attend``. The rules:

- dense layers: SDPA's causal kernel (flash / memory-efficient on a GPU, a fused kernel on CPU);
- banded layers: SDPA with an explicit band mask, on every device, unless the model runs under
  ``torch.compile`` on CUDA, where compiled flex_attention skips the blocks outside the band;
- never flex_attention uncompiled: eager flex is torch's reference path, which materializes the full
  (T, T) score matrix in fp32 and ignores the block mask, and torch 2.13 compiles flex on CPU for
  inference only;
- decoding with a KV cache: SDPA with a mask of absolute positions (no mask at all for one new token
  of a dense layer, which sees the whole prefix).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # flex attention arrived in torch 2.5; the banded layers use an explicit mask without it
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - exercised only on old torch
    BlockMask = create_block_mask = flex_attention = None  # type: ignore[assignment,misc]

Kernel = Literal["sdpa_causal", "sdpa_mask", "sdpa_full", "flex"]
"""sdpa_causal: SDPA with is_causal; sdpa_mask: SDPA with a boolean mask of absolute positions;
sdpa_full: SDPA with no mask (one new token reading the whole cache); flex: compiled flex_attention
with the band's block mask."""

ATTN_IMPLS = ("auto", "sdpa", "flex")


def choose_kernel(
    *,
    device_type: str,
    compiled: bool,
    window: int | None,
    attn_impl: str = "auto",
    cached: bool = False,
    new_tokens: int = 0,
    dropout: bool = False,
    flex_available: bool = flex_attention is not None,
) -> Kernel:
    """The kernel for one attention call. `window` is the layer's band (None for a dense layer),
    `compiled` whether this forward runs under torch.compile, `cached` whether it reads a KV cache
    and `new_tokens` how many positions it adds; `dropout` whether attention dropout is active (flex
    has none). attn_impl='sdpa' keeps banded layers on SDPA even when compiled on CUDA; 'flex' is read
    as 'auto' (flex_attention runs only where it is compiled)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if cached:
        return "sdpa_full" if window is None and new_tokens == 1 else "sdpa_mask"
    if window is None:
        return "sdpa_causal"
    if compiled and device_type == "cuda" and attn_impl != "sdpa" and not dropout and flex_available:
        return "flex"
    return "sdpa_mask"


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean (Tq, Tk) mask, True where query may attend: causal, and within `window` if banded."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    return allowed


def band_block_mask(window: int, T: int, device: torch.device) -> BlockMask:
    """flex_attention's block mask for a causal band of `window` tokens over T positions."""

    def banded_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv <= q) & (q - kv < window)

    return create_block_mask(banded_causal, None, None, T, T, device=str(device))


def attend(
    kernel: Kernel,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None,
    start: int = 0,
    dropout_p: float = 0.0,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
) -> Tensor:
    """Run `kernel` on q (B, H, Tq, Dh) at positions start.., against k, v (B, H, Tk, Dh) at 0..Tk.
    `block_mask` is the flex kernel's (band_block_mask); the other kernels ignore it. `scale` multiplies
    the scores (None: 1/sqrt(Dh); μP's is another, ModelConfig.attn_scale)."""
    if kernel == "sdpa_causal":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    if kernel == "sdpa_full":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if kernel == "flex":
        if block_mask is None:
            raise ValueError("the flex kernel needs the band's block mask")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    q_pos = torch.arange(start, start + q.size(-2), device=q.device)
    mask = attention_mask(q_pos, torch.arange(k.size(-2), device=q.device), window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
