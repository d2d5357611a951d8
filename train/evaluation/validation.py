"""Validation loss, perplexity and bits per byte on a run's prepared sources: outside the training loop
(``validation_metrics``), and inside it (``Validator``, sharded over ranks, due every eval.every steps).

Bits per byte is the loss in bits divided by the bytes each token stands for, so it compares models
with different tokenizers (GPT-3 reports perplexity per token only, which does not transfer across
vocabularies). The windows are the ones the trainer's own evaluation reads (Mixture.val_batches), and the
mixture's figure weighs the sources with the run's own weights (its config.yaml, not prepare's), so the
figures match metrics.jsonl's val_loss and val_bpb for the same batch count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn

from ..config.schema import Config
from ..data.mixture import Mixture, read_manifest
from ..data.tokenizer import tokenizer_hash
from ..engine import DistEnv
from ..errors import UserError
from ..metrics import Console
from ..schedule import Cadence
from .probe import FewshotProbe


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
    bits per byte and the number of tokens scored. Sources without a validation window are left out, and
    the mixture's figures weigh the others with their weights renormalized (Mixture.validation_weights)."""
    if batch_size < 1 or max_batches < 1:
        raise UserError(f"batch size and batches must be positive, got {batch_size} and {max_batches}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    weights = mixture.validation_weights()
    try:
        for name in weights.weights:
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
    finally:
        model.train(was_training)
    if out:
        loss = weights.weigh({name: v["loss"] for name, v in out.items()})
        out["mixture"] = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bpb": weights.weigh({name: v["bpb"] for name, v in out.items()}),
            "tokens": sum(v["tokens"] for v in out.values()),
        }
    return out


class Validator:
    """Validation loss and bits per byte per source and for the mixture (weighted by the mixture's
    weights), plus the optional few-shot probe; due every eval.every steps and at the last step."""

    def __init__(self, cfg: Config, env: DistEnv, mixture: Mixture, run_dir: Path) -> None:
        self.cfg, self.env, self.mixture = cfg, env, mixture
        self.weights = mixture.validation_weights()  # a source without a validation window is left out, not 0
        self.cadence = Cadence(cfg.eval.every, at_end=bool(cfg.eval.every))
        self.probe = None
        if cfg.eval.fewshot_probe:  # every rank: it is deterministic, and under ZeRO-3 forward is collective
            self.probe = FewshotProbe.for_run(run_dir, cfg.model.n_ctx)

    @staticmethod
    def check(cfg: Config, mixture: Mixture, console: Console) -> None:
        """Refuse a run that would evaluate with no source to evaluate on, and say once which sources the
        mixture figures leave out: called before anything is written, so a refusal changes nothing."""
        weights = mixture.validation_weights()
        if cfg.eval.every and not weights.weights:
            raise UserError(
                f"no source has a validation window of n_ctx+1={cfg.model.n_ctx + 1} tokens, so val_loss cannot "
                f"be computed; raise data.val_fraction and re-run scalegpt prepare, or set eval.every=0"
            )
        warning = weights.warning() if cfg.eval.every else None
        if warning is not None:
            console.print(f"scalegpt: {warning}")

    def should_evaluate(self, step: int, *, last: bool) -> bool:
        return self.cadence.due(step, last=last)

    @torch.no_grad()
    def evaluate(self, engine: Any) -> dict[str, Any]:
        """Batches are sharded over ranks; the per-source sums stay on the device until one all-reduce and
        one read at the end."""
        engine.eval()
        names = self.mixture.names
        sums = torch.zeros(len(names), 2, dtype=torch.float64, device=self.env.device)  # (source, [loss x n, n])
        for i, name in enumerate(names):
            batches = self.mixture.val_batches(name, self.cfg.train.micro_batch, self.cfg.eval.batches)
            for j, data in enumerate(batches):
                if j % self.env.world_size != self.env.rank:
                    continue
                data = data.to(self.env.device)
                _, loss = engine.module(data[:, :-1], data[:, 1:])
                n = data[:, 1:].numel()
                sums[i, 0] += loss.detach().double() * n
                sums[i, 1] += n
        dist.all_reduce(sums)
        out: dict[str, Any] = {}
        losses, bpbs = {}, {}
        for name, (total, count) in zip(names, sums.tolist(), strict=True):
            if count == 0:
                continue
            loss = total / count
            bpb = loss / math.log(2) / self.mixture.val_bytes_per_token(name)  # loss x tokens / (ln2 x bytes)
            out[f"val_loss/{name}"], out[f"val_bpb/{name}"] = loss, bpb
            losses[name], bpbs[name] = loss, bpb
        out["val_loss"], out["val_bpb"] = self.weights.weigh(losses), self.weights.weigh(bpbs)
        if self.weights.left_out:
            out["val_left_out"] = ",".join(self.weights.left_out)  # text, which wandb logs as it is
        if self.probe is not None:
            out.update(self.probe(engine.module))  # fewshot/mc-2D+, fewshot/2D+ at K=few
        return out
