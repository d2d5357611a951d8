"""The GPT-2/3 decoder-only transformer (GPT-3 paper, Section 2.1), in plain PyTorch.

Parameter names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.N.attn.c_attn,
...), so exporting is a transpose of the Conv1D weights and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

try:  # flex attention arrived in torch 2.5; the banded layers fall back to an explicit mask without it
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - exercised only on old torch
    create_block_mask = flex_attention = None


def is_local_layer(config: ModelConfig, layer: int) -> bool:
    """GPT-3 alternates dense and locally banded layers; we make the odd layers the banded ones."""
    return config.attention == "alternating" and layer % 2 == 1


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean (Tq, Tk) mask, True where query may attend: causal, and within `window` if banded."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    return allowed


@dataclass
class KVCache:
    """Pre-allocated keys and values for every layer: (n_layer, B, n_head, n_ctx, d_head) each."""

    k: Tensor
    v: Tensor
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, *, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        shape = (config.n_layer, batch, config.n_head, config.n_ctx, config.d_head)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; banded to `local_window` tokens on GPT-3's sparse layers."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        self.layer = layer
        self.window = config.local_window if is_local_layer(config, layer) else None
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self._block_masks: dict[tuple[int, str], object] = {}

    def _use_flex(self, x: Tensor) -> bool:
        if self.window is None or flex_attention is None or self.attn_impl == "sdpa":
            return False
        return self.attn_impl == "flex" or x.is_cuda

    def _flex_block_mask(self, T: int, device: torch.device) -> object:
        key = (T, str(device))
        if key not in self._block_masks:
            window = self.window

            def banded_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                return (kv <= q) & (q - kv < window)

            self._block_masks[key] = create_block_mask(banded_causal, None, None, T, T, device=str(device))
        return self._block_masks[key]

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        if cache is not None:
            start = cache.length
            cache.k[self.layer, :B, :, start : start + T] = k
            cache.v[self.layer, :B, :, start : start + T] = v
            k, v = cache.k[self.layer, :B, :, : start + T], cache.v[self.layer, :B, :, : start + T]
            if T == 1 and self.window is None:
                y = F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole prefix
            else:
                q_pos = torch.arange(start, start + T, device=x.device)
                mask = attention_mask(q_pos, torch.arange(start + T, device=x.device), self.window)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.window is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # flash kernel on GPU
        elif self._use_flex(x):
            y = flex_attention(q, k, v, block_mask=self._flex_block_mask(T, x.device))
        else:
            pos = torch.arange(T, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos, pos, self.window), dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, d_ff = 4 * d_model with GELU (GPT-2's tanh approximation)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: LayerNorm before attention and before the MLP (GPT-2 Section 2.3)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, n_layer blocks, final LayerNorm, output tied to wte."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.n_ctx, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialization: N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2*n_layer))
        so the residual stream's variance does not grow with depth (GPT-2 Section 2.3). Separate from
        construction so a model built on the meta device can be materialized, then initialized."""
        gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)

        def normal_(t: Tensor, std: float) -> None:
            t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                normal_(module.weight, resid_std if name.endswith("c_proj") else 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count; the tied output layer is counted once (it is wte)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy against targets or None)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_ctx:
            raise ValueError(f"sequence of {start + T} tokens exceeds n_ctx={self.config.n_ctx}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)  # recompute activations in backward
            else:
                x = block(x, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.transformer.wte.weight)  # output layer tied to the token embedding
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu", seed: int | None = None) -> GPT:
    """Build on the meta device (no memory), then materialize on `device` and initialize."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
