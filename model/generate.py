"""Autoregressive generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling.

Pure PyTorch, shared by `scalegpt sample` and evaluation.

Prompts of different lengths run in lockstep: every row is prefilled up to the shortest prompt, then
all rows advance one position per step, and a row whose prompt is not used up yet is fed its next
prompt token instead of a sampled one. Every row thus has the same length at every step, positions
stay absolute and no padding mask is needed, so row i sees exactly the tokens it would see alone. The
cost is that a long prompt beside a short one is read one token per step past the shortest.

Past n_ctx: positions are learned absolute embeddings (GPT-2 Section 2.3), so the cached keys and
values are tied to the positions they were computed at and the cache cannot slide one token at a time.
Instead, when the sequence no longer fits, the window jumps forward by `shift` tokens and is
re-encoded from scratch with one prefill (the analogue of llama.cpp's context shift). The window
start is a pure function of the sequence length (`window_start`), and the uncached path conditions on
exactly the same window, so cached and uncached generation agree token for token at any length.
Cost: one prefill of about n_ctx - shift tokens per `shift` new tokens. The default shift n_ctx // 2
costs about one extra (batched, so cheap) token of prefill per generated token and conditions every
token on n_ctx // 2 to n_ctx tokens; shift=1 is the textbook sliding window (always the last n_ctx
tokens) at the price of a full n_ctx prefill for every token, which is what the uncached path pays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .gpt import GPT, KVCache

Generators = torch.Generator | Sequence[torch.Generator | None] | None
OnToken = Callable[[int, int], bool | None]


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), the rest become -inf.
    k <= 0 or k >= vocab leaves the logits unchanged."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose total
    probability reaches p; the most likely token always survives. p >= 1 leaves the logits unchanged."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_ahead = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_ahead >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Generators = None,
) -> Tensor:
    """(B, vocab) logits -> (B,) token ids. Temperature 0 is greedy. One generator draws for the whole
    batch; a sequence of B generators gives each row its own stream, so a row's sample does not depend
    on which other rows share the batch (a None entry draws nothing and returns that row's argmax, for a
    row whose token is not wanted)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.size(0):
        raise ValueError(f"got {len(generator)} generators for a batch of {probs.size(0)} rows")
    return torch.cat(
        [
            row.argmax(-1, keepdim=True) if g is None else torch.multinomial(row, 1, generator=g)
            for row, g in zip(probs, generator, strict=True)
        ]
    )


def window_start(length: int, n_ctx: int, shift: int) -> int:
    """First position of the window that the token after `length` tokens is conditioned on: 0 while
    the sequence fits, then advancing in steps of `shift` so that at most n_ctx tokens remain."""
    if length <= n_ctx:
        return 0
    return -(-(length - n_ctx) // shift) * shift  # ceil((length - n_ctx) / shift) * shift


def _as_rows(prompts: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, Tensor) and prompts.dim() != 2:
        raise ValueError(f"prompt tensor must be (batch, time), got shape {tuple(prompts.shape)}")
    rows = prompts.tolist() if isinstance(prompts, Tensor) else [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (start an empty one with the end-of-text id)")
    return rows


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Generators = None,
    eot_id: int | None = None,
    use_cache: bool = True,
    shift: int | None = None,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens and return only the new tokens, per row.

    A row stops early at eot_id (which is not returned) or when on_token(row, token), called for every
    other new token as it is generated, returns True (that token is the row's last). `shift` is how far
    the window jumps past n_ctx (default n_ctx // 2; see the module docstring)."""
    rows = _as_rows(prompts)
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
            f"{max_new_tokens}, {temperature}, {top_k}, {top_p}"
        )
    n_ctx = model.config.n_ctx
    shift = max(1, n_ctx // 2) if shift is None else shift
    if not 1 <= shift <= n_ctx:
        raise ValueError(f"shift must be in [1, n_ctx={n_ctx}], got {shift}")
    if max_new_tokens == 0:
        return [[] for _ in rows]
    param = next(model.parameters())
    lengths = [len(r) for r in rows]
    lo, hi = min(lengths), max(lengths)
    total = hi + max_new_tokens
    stop = [n + max_new_tokens for n in lengths]  # exclusive end of each row's tokens in `seq`

    seq = torch.zeros(len(rows), total, dtype=torch.long, device=param.device)  # (B, prompt + new)
    for i, row in enumerate(rows):
        seq[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    in_prompt = torch.arange(total, device=param.device) < torch.tensor(lengths, device=param.device)[:, None]
    cache = KVCache.empty(model.config, len(rows), device=param.device, dtype=param.dtype) if use_cache else None
    cache_start = 0
    watch = eot_id is not None or on_token is not None  # needs the new tokens on the host every step

    was_training = model.training
    model.eval()
    try:
        for pos in range(lo, total):
            start = window_start(pos, n_ctx, shift)
            if cache is None:
                logits = model(seq[:, start:pos])[0][:, -1]
            else:
                if start != cache_start:  # the window jumped: its positions changed, so re-encode it
                    cache.length, cache_start = 0, start
                logits = model(seq[:, cache_start + cache.length : pos], cache=cache)[0][:, -1]
            gen = generator
            if pos < hi and isinstance(generator, Sequence):  # a row reading its prompt must not use up draws
                gen = [g if pos >= n else None for g, n in zip(generator, lengths, strict=True)]
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            if pos < hi:  # rows still reading their prompt take the prompt's token
                nxt = torch.where(in_prompt[:, pos], seq[:, pos], nxt)
            seq[:, pos] = nxt
            if watch:
                for i, token in enumerate(nxt.tolist()):
                    if not lengths[i] <= pos < stop[i]:
                        continue
                    if token == eot_id:
                        stop[i] = pos
                    elif on_token is not None and on_token(i, token):
                        stop[i] = pos + 1
                if all(s <= pos + 1 for s in stop):
                    break
    finally:
        model.train(was_training)
    out = seq.tolist()
    return [out[i][n : stop[i]] for i, n in enumerate(lengths)]
