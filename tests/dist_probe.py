"""Run under a launcher (one process per rank): builds scalegpt's real engine at ZeRO stage 0 and 2
for the tiny model, takes one step, and writes the element counts each rank holds to OUT/rank_R.json.
Not collected by pytest; tests/test_train_e2e.py launches it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from scalegpt.model import build_model
from scalegpt.train.config import load_config
from scalegpt.train.engine import build_engine, init_distributed


def optimizer_state_elements(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())


def main(config: str, out: Path) -> None:
    result: dict[str, int] = {}
    env = None
    for stage in (0, 2):
        cfg = load_config(config, [f"train.zero_stage={stage}", "train.precision=fp32", "train.global_batch=0"])
        env = env or init_distributed(cfg)
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model(cfg.model, seed=0), env)
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.model.n_ctx + 1))
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
        result[f"stage{stage}_adam_state"] = optimizer_state_elements(inner)
        if stage == 2:
            result["stage2_fp32_partition"] = sum(p.numel() for p in engine.optimizer.single_partition_of_fp32_groups)
        result["params"] = sum(p.numel() for p in engine.module.parameters())
    assert env is not None
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    positional = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(positional[0], Path(positional[1]))
