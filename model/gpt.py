"""The GPT-2/3 decoder-only transformer (GPT-3 paper, Section 2.1), in plain PyTorch.

Parameter names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.N.attn.c_attn,
...), so exporting to GPT-2 is a transpose of the Conv1D weights; model/hf.py maps GPT-Neo's layout.

Two parametrizations (ModelConfig.parametrization). 'standard' is GPT-2's. 'mup' is the maximal update
parametrization of Tensor Programs V (Yang et al. 2022), for Adam, as Microsoft's `mup` package applies
it: with m = d_model / mup_base_d_model, the width multiplier,

    =====================================  ==================  ========  ============  ================
    parameter                              init std            Adam LR   weight decay  mup's name
    =====================================  ==================  ========  ============  ================
    wte, wpe (embeddings; wte is also      0.02                lr        wd            vector-like
    the readout, tied)
    attn.c_attn, mlp.c_fc weights          0.02 / sqrt(m)      lr / m    wd * m        matrix-like
    attn.c_proj, mlp.c_proj weights        0.02 / sqrt(2 L m)  lr / m    wd * m        matrix-like
    biases, LayerNorm gains and offsets    0, 1                lr        0             vector-like
    =====================================  ==================  ========  ============  ================

    logits            = (ln_f(x) / m) @ wte^T                    (MuSharedReadout: output_mult / width_mult)
    attention scores  = q.k * sqrt(d_head_base) / d_head          (TP5's 1/d_head attention; d_head_base is
                                                                    ModelConfig.mup_base_d_head or base / n_head)

The weight decay is multiplied by m where the LR is divided by it because AdamW decays by lr * wd per step
(mup's MuAdamW does the same). Hidden matrices have both dimensions growing with width, so Adam's
update, of size lr per entry, moves their output by lr * fan_in: dividing lr by m keeps that fixed. An
embedding's fan-in is the vocabulary or the context, not the width, so its LR and init stay. The tied
readout has the width as its fan-in: instead of scaling the shared weight (which would break the
embedding), its input is divided by m. The 1/d_head attention keeps the scores' size fixed when q and k
become correlated by training, as they do at every width. Every multiplier is 1 at d_model =
mup_base_d_model, so a μP model at its base width is the standard model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Kernel, attend, attention_mask, band_block_mask, choose_kernel
from .config import ModelConfig
from .loss import chunked_cross_entropy, eager_chunked_cross_entropy

__all__ = ["GPT", "KVCache", "WidthScaling", "attention_mask", "build_model", "is_local_layer"]


def is_local_layer(config: ModelConfig, layer: int) -> bool:
    """GPT-3 alternates dense and locally banded layers; we make the odd layers the banded ones."""
    return config.attention == "alternating" and layer % 2 == 1


@dataclass(frozen=True)
class WidthScaling:
    """One parameter's multipliers against the standard parametrization (module docstring's table): of
    its init std, of the Adam learning rate and of the weight decay. All 1 under 'standard'."""

    init: float = 1.0
    lr: float = 1.0
    weight_decay: float = 1.0


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
    """Multi-head causal self-attention; banded to `local_window` tokens on GPT-3's sparse layers.
    The kernel comes from attention.choose_kernel; `compiled` is set from outside (GPT.compiled)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        self.layer = layer
        self.window = config.local_window if is_local_layer(config, layer) else None
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.scale = config.attn_scale  # None: 1/sqrt(d_head); μP: sqrt(d_head_base)/d_head
        self.compiled = False
        qkv_bias = config.bias and config.qkv_bias
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=qkv_bias)  # q, k, v together
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self._block_masks: dict[tuple[int, str], object] = {}

    def kernel(self, device_type: str, *, cached: bool, new_tokens: int) -> Kernel:
        """This call's kernel. Flex needs both the flag and a trace in progress, so a model marked
        compiled but called eagerly still never runs flex uncompiled."""
        return choose_kernel(
            device_type=device_type,
            compiled=self.compiled and torch.compiler.is_compiling(),
            window=self.window,
            attn_impl=self.attn_impl,
            cached=cached,
            new_tokens=new_tokens,
            dropout=self.training and self.dropout > 0,
        )

    def _flex_block_mask(self, T: int, device: torch.device) -> object:
        key = (T, str(device))
        if key not in self._block_masks:
            assert self.window is not None
            self._block_masks[key] = band_block_mask(self.window, T, device)
        return self._block_masks[key]

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        kernel = self.kernel(x.device.type, cached=cache is not None, new_tokens=T)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[self.layer, :B, :, start : start + T] = k
            cache.v[self.layer, :B, :, start : start + T] = v
            k, v = cache.k[self.layer, :B, :, : start + T], cache.v[self.layer, :B, :, : start + T]
        block_mask = self._flex_block_mask(T, x.device) if kernel == "flex" else None
        p = self.dropout if self.training else 0.0
        y = attend(
            kernel, q, k, v, window=self.window, start=start, dropout_p=p, block_mask=block_mask, scale=self.scale
        )
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
    """Token + learned position embeddings, n_layer blocks, final LayerNorm, output tied to wte. Under
    μP the final LayerNorm's output is multiplied by config.output_mult (1/m) before the tied readout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.z_loss = 0.0  # PaLM's auxiliary z-loss coefficient; set from outside, like activation_checkpointing
        self._loss = chunked_cross_entropy
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

    @property
    def compiled(self) -> bool:
        """Whether this model runs under torch.compile. Set from outside by whoever compiles it (the
        engine wrapper), like activation_checkpointing: the attention layers' kernel choice reads it."""
        return bool(self.transformer.h[0].attn.compiled)

    @compiled.setter
    def compiled(self, value: bool) -> None:
        for block in self.transformer.h:
            block.attn.compiled = value
        self._loss = eager_chunked_cross_entropy() if value else chunked_cross_entropy

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, *, device: torch.device | str | None = None) -> None:
        """GPT-2 initialization: N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2*n_layer))
        so the residual stream's variance does not grow with depth (GPT-2 Section 2.3). Under μP the hidden
        matrices' std is further divided by sqrt(m) (the module docstring's table); embeddings keep theirs.

        Separate from construction, so a model built on the meta device is materialized on `device`
        (default CPU) here and initialized where it lives: every weight is drawn in place, on its own
        device, from one generator seeded with `seed` (the device's default generator when None), in
        module order. The same seed and config thus give the same weights on every rank of one device
        type (CUDA's draws depend on the GPU model, so not across models), with no host round trip.
        On CPU they are bit-for-bit those of drawing into a fresh fp32 tensor and copying it in
        (tests/test_model.py holds that reference)."""
        if any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device or "cpu")
        where = self.transformer.wte.weight.device
        gen = None if seed is None else torch.Generator(device=where).manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        hidden = self.width_scaling(hidden=True).init

        def normal_(t: Tensor, std: float) -> None:
            if t.dtype == torch.float32:
                t.normal_(0.0, std, generator=gen)
            else:  # draw in fp32, so a 16-bit model gets the rounded fp32 weights, not other draws
                t.copy_(torch.empty(t.shape, dtype=torch.float32, device=t.device).normal_(0.0, std, generator=gen))

        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):  # the hidden matrices: the readout is wte, not a Linear
                normal_(module.weight, (resid_std if name.endswith("c_proj") else 0.02) * hidden)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    def width_scaling(self, *, hidden: bool) -> WidthScaling:
        """The multipliers of a hidden matrix (a Linear weight: both dimensions grow with width) or of any
        other parameter, which under μP keeps the standard init and LR (module docstring's table). The
        init multiplier is written m**-0.5, as mup.init writes it, so the two draw the same weights."""
        m = self.config.width_mult
        if not hidden or not self.config.is_mup:
            return WidthScaling()
        return WidthScaling(init=m**-0.5, lr=1.0 / m, weight_decay=m)

    def param_scaling(self) -> dict[str, WidthScaling]:
        """Each parameter's WidthScaling, by name: what an optimizer needs to build μP's groups."""
        return {
            f"{module_name}.{name}".lstrip("."): self.width_scaling(
                hidden=isinstance(module, nn.Linear) and name == "weight"
            )
            for module_name, module in self.named_modules()
            for name, _ in module.named_parameters(recurse=False)
        }

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count; the tied output layer is counted once (it is wte)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), None) without targets, or (None, mean
        cross-entropy) with them: training never materializes the whole micro batch's logits
        (model/loss.py). Targets equal to -1 are ignored."""
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
        if self.config.is_mup:
            x = x * self.config.output_mult  # μP's readout multiplier; on (B, T, C), cheaper than on the logits
        w = self.transformer.wte.weight  # the output layer is tied to the token embedding
        if targets is None:
            return F.linear(x, w), None
        return None, self._loss(x.reshape(B * T, -1), w, targets.reshape(-1), self.z_loss)


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu", seed: int | None = None) -> GPT:
    """Build on the meta device (no memory, no draws), then materialize and initialize on `device`."""
    with torch.device("meta"):
        model = GPT(config)
    model.init_weights(seed, device=device)
    return model
