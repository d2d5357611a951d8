"""ModelConfig: the shape of the network, and nothing about how it is trained."""

from __future__ import annotations

import math
from dataclasses import dataclass

PARAMETRIZATIONS = ("standard", "mup")


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
    parametrization: str = "standard"
    """'standard' (GPT-2's initialization, one learning rate, 1/sqrt(d_head) attention) or 'mup', the maximal
    update parametrization (Yang et al. 2022, "Tensor Programs V"): initialization, each layer's learning
    rate, the output logits and the attention scale change with d_model / mup_base_d_model, so that the best
    learning rate and initialization found at the base width stay the best at any width. model/gpt.py's
    GPT docstring and docs/mup.md hold the table of rules."""
    mup_base_d_model: int | None = None
    """The width that μP scales from (required under mup, refused under standard). At d_model equal to it a
    μP model is the standard one, so settings tuned there are the μP settings of every width."""
    mup_base_d_head: int | None = None
    """The head width at the base shape (mup only); unset means mup_base_d_model / n_head, right when the head
    count stays fixed as the model widens. A sweep that widens by adding heads of a fixed width sets it to
    that width, so that its attention keeps the standard 1/sqrt(d_head) scale at every width."""
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
        return out + self._parametrization_problems()

    def _parametrization_problems(self) -> list[tuple[str, str]]:
        if self.parametrization not in PARAMETRIZATIONS:
            return [("parametrization", f"must be 'standard' or 'mup', got {self.parametrization!r}")]
        keys = ("mup_base_d_model", "mup_base_d_head")
        if self.parametrization == "standard":  # refused, not ignored: a silently ignored key reads as μP on
            return [
                (key, "is read only under model.parametrization=mup; set that too, or remove this key")
                for key in keys
                if getattr(self, key) is not None
            ]
        out: list[tuple[str, str]] = []
        if self.mup_base_d_model is None or self.mup_base_d_model <= 0:
            got = "nothing" if self.mup_base_d_model is None else self.mup_base_d_model
            out.append(
                (
                    "mup_base_d_model",
                    f"must be a positive width under model.parametrization=mup (the width whose tuned settings "
                    f"μP carries to others, for example the smallest model of a sweep), got {got}",
                )
            )
        if self.mup_base_d_head is not None and self.mup_base_d_head <= 0:
            out.append(("mup_base_d_head", f"must be a positive head width, got {self.mup_base_d_head}"))
        elif self.mup_base_d_head is None and self.n_head > 0 and (self.mup_base_d_model or 0) % self.n_head:
            out.append(
                (
                    "mup_base_d_model",
                    f"{self.mup_base_d_model} does not split into n_head={self.n_head} heads; choose a multiple of "
                    f"{self.n_head}, or set model.mup_base_d_head to the head width of the base shape",
                )
            )
        return out

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def is_mup(self) -> bool:
        return self.parametrization == "mup"

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m = d_model / mup_base_d_model; 1 under the standard parametrization."""
        return self.d_model / self.mup_base_d_model if self.is_mup and self.mup_base_d_model else 1.0

    @property
    def output_mult(self) -> float:
        """What multiplies the final LayerNorm's output before the tied readout: 1/m under μP (MuSharedReadout)."""
        return 1.0 / self.width_mult

    @property
    def attn_scale(self) -> float | None:
        """The attention scores' scale: None for the standard 1/sqrt(d_head) (SDPA's default); under μP
        sqrt(base d_head) / d_head, which is 1/d_head up to a constant and equals 1/sqrt(d_head) at the base."""
        if not self.is_mup:
            return None
        base_d_head = self.mup_base_d_head or (self.mup_base_d_model or 0) / self.n_head
        return math.sqrt(base_d_head) / self.d_head
