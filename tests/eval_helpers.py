"""Helpers for the eval, plot, sampling and generation tests.

- TableLM / chain_model: a bigram "model" whose log-likelihoods we set, so scores are known by hand;
- varied_weights: a real GPT whose greedy output depends on its context;
- export_untrained: an untrained model exported beside a prepared corpus, for `scalegpt eval`;
- tiny_world: a tiny prepared corpus, an exported model on it and a fake run directory, made in-process
  (no subprocess, no DeepSpeed) once per test session under pytest's base temp folder."""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from scalegpt.model import GPT, ModelConfig
from scalegpt.model.gpt import KVCache
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import Config, to_yaml

N_CTX = 32
BATCH = 16  # sequences per step in the fake run


@dataclass(frozen=True)
class TinyWorld:
    config: Config
    data: Path
    export: Path
    """model.safetensors + config.yaml + tokenizer.json: a run, checkpoint or export for `scalegpt eval`."""
    run: Path
    """config.yaml, tokenizer.json and a synthetic metrics.jsonl of 60 steps: for `scalegpt plot`."""


def _config_text(root: Path) -> str:
    return textwrap.dedent(
        f"""
        run: {{dir: {root / "run"}, seed: 3}}
        model: {{n_layer: 1, n_head: 2, d_model: 32, n_ctx: {N_CTX}, vocab_size: 300}}
        train: {{global_batch: {BATCH}, micro_batch: {BATCH}}}
        data:
          dir: {root / "data"}
          tokenizer: bpe
          tokenizer_sample_mb: 0.1
          val_fraction: 0.05
          num_proc: 1
          sources:
            - {{name: arithmetic, builtin: arithmetic, builtin_mb: 0.04, weight: 0.6}}
            - {{name: prose, builtin: prose, builtin_mb: 0.04, weight: 0.4}}
        """
    )


def metrics_records(steps: int = 60) -> list[dict[str, float | int | None]]:
    """What the trainer writes: a record per step, validation every 20 steps."""
    out: list[dict[str, float | int | None]] = []
    for s in range(1, steps + 1):
        r: dict[str, float | int | None] = {
            "step": s,
            "tokens": s * BATCH * N_CTX,
            "loss": 5.0 / s**0.3,
            "lr": 1e-3 * min(1.0, s / 10),
            "grad_norm": 1.0 / s,
            "tokens_per_sec": 1000.0 + s,
            "mfu": None,
            "world_size": 2,
            "elapsed_s": s * 0.1,
        }
        if s % 20 == 0:
            r.update({"val_loss": 4.0 / s**0.3, "val_bpb": 2.0 / s**0.3})
            r.update({"val_loss/arithmetic": 3.5 / s**0.3, "val_bpb/arithmetic": 1.8 / s**0.3})
            r.update({"val_loss/prose": 4.5 / s**0.3, "val_bpb/prose": 2.2 / s**0.3})
        out.append(r)
    return out


def export_untrained(cfg: Config, data: Path, export: Path) -> None:
    """An untrained model of `cfg` (seed 0) in `export`, with its config and the tokenizer of the prepared
    `data`: what `scalegpt eval` reads from a run, checkpoint or export."""
    export.mkdir()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    (export / "config.yaml").write_text(to_yaml(cfg))
    shutil.copy(data / "tokenizer.json", export / "tokenizer.json")


def tiny_world(factory: pytest.TempPathFactory) -> TinyWorld:
    root = factory.getbasetemp() / "eval-tiny-world"
    done = root / "done"
    if not done.is_file():
        from scalegpt.launch.cli import main

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "tiny.yaml").write_text(_config_text(root))
        assert main(["prepare", str(root / "tiny.yaml")]) == 0
        cfg = load_config(root / "tiny.yaml")
        export_untrained(cfg, root / "data", root / "export")
        run = root / "run"
        run.mkdir()
        (run / "config.yaml").write_text(to_yaml(cfg))
        shutil.copy(root / "data" / "tokenizer.json", run / "tokenizer.json")
        lines = [json.dumps(r) for r in metrics_records()]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        done.touch()
    return TinyWorld(load_config(root / "tiny.yaml"), root / "data", root / "export", root / "run")


def varied_weights(model: GPT) -> GPT:
    """Random weights whose greedy output changes with position and context. GPT-2's own init with
    tied embeddings makes every token predict itself, so greedy would repeat one token and hide cache
    bugs. Token embeddings of norm 3, position embeddings N(0, 1) and N(0, 0.3) elsewhere give varied
    output whose argmax depends on the context, so a cache that keeps stale keys changes the text."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        wte = model.transformer.wte.weight
        wte.copy_(3 * wte / wte.norm(dim=1, keepdim=True))
        model.transformer.wpe.weight.normal_(0.0, 1.0)
        model.transformer.ln_f.bias.zero_()
    return model.eval()


class TableLM(nn.Module):
    """logits[b, t] = table[idx[b, t]]: a bigram model whose probabilities we set."""

    def __init__(self, table: Tensor, n_ctx: int = 64) -> None:
        super().__init__()
        v = table.shape[0]
        self.config = ModelConfig(n_layer=1, n_head=1, d_model=4, n_ctx=n_ctx, vocab_size=v)
        self.table = nn.Parameter(table.clone().float())
        self.calls = 0

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None):  # noqa: ANN201
        if idx.shape[1] + (cache.length if cache is not None else 0) > self.config.n_ctx:
            raise ValueError("past n_ctx")
        self.calls += 1
        if cache is not None:
            cache.length += idx.shape[1]
        return self.table[idx], None


def chain_model(tok: Tokenizer, chain: dict[str, str], strength: float = 20.0) -> TableLM:
    """Greedy decoding follows `chain` (character -> next character), with near certainty by default."""
    v = tok.get_vocab_size()
    table = torch.zeros(v, v)
    for a, b in chain.items():
        table[tok.encode(a).ids[0], tok.encode(b).ids[0]] = strength
    return TableLM(table)
