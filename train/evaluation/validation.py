"""Validation loss, perplexity and bits per byte on a run's prepared sources, outside the training loop.

Bits per byte is the loss in bits divided by the bytes each token stands for, so it compares models
with different tokenizers (GPT-3 reports perplexity per token only, which does not transfer across
vocabularies). The windows are the ones the trainer's own evaluation reads (Mixture.val_batches), and the
mixture's figure weighs the sources with the run's own weights (its config.yaml, not prepare's), so the
figures match metrics.jsonl's val_loss and val_bpb for the same batch count.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from ..config.schema import Config
from ..data.mixture import Mixture, read_manifest
from ..data.tokenizer import tokenizer_hash
from ..errors import UserError


def open_validation_data(
    cfg: Config, tokenizer: Tokenizer, data_dir: str | Path | None = None
) -> tuple[Mixture | None, str]:
    """The run's prepared data as a Mixture, or None and why not. The config's data.dir is tried unless
    `data_dir` is given; a missing or mismatched default is a note, a bad explicit one a UserError."""
    explicit = data_dir is not None
    where = Path(data_dir if explicit else cfg.data.dir).expanduser()
    try:
        if read_manifest(where) is None:
            raise UserError(
                f"no prepared data at {where} (no manifest.json); run `scalegpt prepare CONFIG` or pass --data-dir"
            )
        expect = tokenizer_hash(tokenizer)
        if _run_weights_apply(cfg, where):
            mixture = Mixture.for_config(cfg, data_dir=where, tokenizer_hash=expect)
        else:  # other data than the run trained on (--data-dir): its sources weighed as prepared
            mixture = Mixture(where, cfg.model.n_ctx, cfg.run.seed, tokenizer_hash=expect)
            return mixture, f"validation on {where}, whose sources are not the run's: weighed as prepared"
    except UserError as exc:
        if explicit:
            raise
        return None, f"validation skipped: {exc}"
    return mixture, f"validation on {where}, weighed as the run was trained"


def _run_weights_apply(cfg: Config, where: Path) -> bool:
    """Whether the run's sources are the ones prepared in `where`, so that its weights can weigh them."""
    manifest = read_manifest(where)
    prepared = [e["name"] for e in manifest["sources"]] if manifest else []
    return sorted(prepared) == sorted(s.name for s in cfg.data.sources)


@torch.inference_mode()
def validation_metrics(
    model: nn.Module, mixture: Mixture, *, batch_size: int = 16, max_batches: int = 50
) -> dict[str, dict[str, float]]:
    """Per source, and for the mixture weighted as in training: loss (nats per token), perplexity,
    bits per byte and the number of tokens scored. Sources without a validation split are left out."""
    if batch_size < 1 or max_batches < 1:
        raise UserError(f"batch size and batches must be positive, got {batch_size} and {max_batches}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    mix = {"loss": 0.0, "bpb": 0.0, "tokens": 0.0}
    try:
        for i, name in enumerate(mixture.names):
            total, count = 0.0, 0
            for batch in mixture.val_batches(name, batch_size, max_batches):
                batch = batch.to(device)
                _, loss = model(batch[:, :-1], batch[:, 1:])
                n = batch[:, 1:].numel()
                total += float(loss) * n
                count += n
            if count == 0:
                continue
            loss = total / count
            bpb = loss / math.log(2) / mixture.val_bytes_per_token(name)
            out[name] = {"loss": loss, "perplexity": math.exp(loss), "bpb": bpb, "tokens": float(count)}
            w = float(mixture.weights[i])
            mix["loss"] += w * loss
            mix["bpb"] += w * bpb
            mix["tokens"] += count
    finally:
        model.train(was_training)
    if out:
        out["mixture"] = {
            "loss": mix["loss"],
            "perplexity": math.exp(mix["loss"]),
            "bpb": mix["bpb"],
            "tokens": mix["tokens"],
        }
    return out
