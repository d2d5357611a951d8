"""ModelConfig: the shape of the network, and nothing about how it is trained."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """GPT-2/3 hyper-parameters (GPT-3 paper, Table 2.1). Every field has a default so a tiny model is
    one line: ``ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=16, vocab_size=50)``."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; d_model must divide by it."""
    d_model: int = 768
    """Width of the residual stream."""
    n_ctx: int = 2048
    """Context length in tokens (learned position embeddings cover exactly this many)."""
    vocab_size: int = 50257
    """Token vocabulary size (GPT-2's BPE has 50257)."""
    d_ff: int = 0
    """Feed-forward width; 0 means 4 * d_model, as in the paper."""
    dropout: float = 0.0
    """Dropout on embeddings, attention output and MLP output."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them)."""
    qkv_bias: bool = True
    """Biases on the query, key and value projections (c_attn), when `bias` is on. GPT-2 has them;
    GPT-Neo, EleutherAI's GPT-3 replica, does not, and a query bias has no GPT-Neo equivalent, so a
    model with alternating attention exports to Hugging Face only with this off (model/hf.py)."""
    attention: str = "dense"
    """'dense' (every layer causal) or 'alternating' (GPT-3: dense and locally banded layers alternate)."""
    local_window: int = 256
    """Band width in tokens of the local layers when attention is 'alternating'."""
    attn_impl: str = "auto"
    """Kernel of the banded layers. 'auto': compiled flex_attention (it skips blocks outside the band)
    when train.compile is on and the device is CUDA, else SDPA with the band mask. 'sdpa': always SDPA
    with the band mask. 'flex' reads as 'auto' (flex_attention only ever runs compiled); it is kept so
    older configs load. model/attention.py's choose_kernel holds the rule."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2 uses 1e-5)."""
    init_from: str | None = None
    """Start training from these weights instead of a random draw: a Hugging Face GPT-2 or GPT-Neo folder,
    or a scalegpt run, checkpoint or export directory. Only the weights are taken (optimizer, schedule, data
    order and step start fresh), and the shape comes from the source. GPT itself never reads this field;
    the trainer does (train/config.py and train/inference.py hold the rules)."""

    def __post_init__(self) -> None:
        for problem in self.problems():
            raise ValueError(problem[0] + ": " + problem[1])

    def problems(self) -> list[tuple[str, str]]:
        """Every inconsistency as (field, message), so a config loader can name the key."""
        out: list[tuple[str, str]] = []
        for name in ("n_layer", "n_head", "d_model", "n_ctx", "vocab_size", "local_window"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be a positive integer, got {getattr(self, name)}"))
        if self.n_head > 0 and self.d_model % self.n_head:
            out.append(("d_model", f"{self.d_model} is not divisible by n_head={self.n_head}"))
        if self.d_ff < 0:
            out.append(("d_ff", f"must be >= 0 (0 means 4*d_model), got {self.d_ff}"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.attention not in ("dense", "alternating"):
            out.append(("attention", f"must be 'dense' or 'alternating', got {self.attention!r}"))
        if self.attn_impl not in ("auto", "flex", "sdpa"):
            out.append(("attn_impl", f"must be 'auto', 'flex' or 'sdpa', got {self.attn_impl!r}"))
        return out

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model
