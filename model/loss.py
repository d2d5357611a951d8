"""Cross-entropy of the tied output layer, without the micro batch's logits.

``F.cross_entropy(F.linear(x, wte).float(), targets)`` holds the (rows, vocab) logits, their fp32
copy, the saved log-softmax and, in backward, two more gradients of that size: for GPT-2's vocabulary
more than all the blocks' activations together. Here the forward pass runs over chunks of rows and
keeps only each row's log-sum-exp; the backward pass recomputes the logits one slice of the
vocabulary at a time (all rows, ``vocab_slice`` columns), so at most about ``LOSS_CHUNK_ELEMENTS``
logits exist at once. Slicing the vocabulary in backward, rather than the rows, writes each slice of
the weight's gradient with one matmul over every row, in the weight's dtype, as the unchunked loss
does; only the small (rows, d_model) input gradient is summed over slices, in fp32.

The price is one more (rows x d_model x vocab) matmul, the recomputed logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .flops import loss_chunks

IGNORE_INDEX = -1
"""Targets equal to this add nothing to the loss, as with F.cross_entropy(ignore_index=-1)."""


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, targets: Tensor, z_loss: float
    ) -> Tensor:
        rows, vocab_slice = loss_chunks(x.size(0), weight.size(0))
        valid = targets != IGNORE_INDEX
        lse = torch.empty(x.size(0), dtype=torch.float32, device=x.device)  # log-sum-exp per row
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for r in range(0, x.size(0), rows):
            logits = F.linear(x[r : r + rows], weight).float()  # (rows, V), the only logits alive
            lse[r : r + rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[r : r + rows].clamp_min(0)[:, None]).squeeze(1)
            row_loss = lse[r : r + rows] - picked
            if z_loss:  # PaLM Section 5: z_loss x log(Z)^2 keeps the normalizer Z near 1
                row_loss = row_loss + z_loss * lse[r : r + rows].square()
            total += torch.where(valid[r : r + rows], row_loss, 0.0).sum()
            del logits  # before the next chunk's logits, not after
        count = valid.sum()
        ctx.save_for_backward(x, weight, targets, lse, count)
        ctx.vocab_slice, ctx.z_loss = vocab_slice, z_loss
        return total / count

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x, weight, targets, lse, count = ctx.saved_tensors
        step = ctx.vocab_slice
        scale = torch.where(targets != IGNORE_INDEX, grad.float() / count, 0.0)[:, None]  # (N, 1)
        grad_w = torch.empty_like(weight)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for v in range(0, weight.size(0), step):
            w = weight[v : v + step]
            # d loss / d logits = (softmax - onehot(target)) * scale, for this slice of the vocabulary
            d = F.linear(x, w).float().sub_(lse[:, None]).exp_()  # (N, slice) softmax
            if ctx.z_loss:  # d (z log(Z)^2) / d logits = 2 z log(Z) softmax
                d.mul_(1.0 + 2.0 * ctx.z_loss * lse[:, None])
            hit = (targets >= v) & (targets < v + w.size(0))
            d.scatter_add_(1, (targets - v).clamp(0, w.size(0) - 1)[:, None], -hit.to(d.dtype)[:, None])
            d = d.mul_(scale).to(weight.dtype)
            torch.mm(d.t(), x, out=grad_w[v : v + step])
            if grad_x.dtype == d.dtype:
                grad_x.addmm_(d, w)
            else:
                grad_x += d @ w
            del d  # before the next slice's logits, not after
        return grad_x.to(x.dtype), grad_w, None, None


def chunked_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, z_loss: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``F.linear(x, weight)`` against `targets`, skipping IGNORE_INDEX, plus
    ``z_loss * log(Z)^2`` per row when z_loss > 0 (PaLM Section 5). x (N, d_model), weight (vocab, d_model),
    targets (N,). Equals F.cross_entropy on the fp32 logits up to fp32 rounding (the sums run in another
    order)."""
    if x.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"need x (N, d) and targets (N,), got {tuple(x.shape)} and {tuple(targets.shape)}")
    return _ChunkedCrossEntropy.apply(x, weight, targets, z_loss)


@functools.cache
def eager_chunked_cross_entropy() -> Callable[..., Tensor]:
    """chunked_cross_entropy kept out of torch.compile's graph (its loops would unroll into it; the
    matmuls are already whole). Made on first use: torch.compiler.disable imports the compiler stack,
    seconds that a model which is never compiled should not pay."""
    return torch.compiler.disable(chunked_cross_entropy)
