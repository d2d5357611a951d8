"""Checkpoint save and load: seconds and bytes, for one process on CPU, through scalegpt's own save
(DeepSpeed's partitioned ZeRO files, RNG states, metadata, atomic `latest`) and DeepSpeed's load.

    python bench/checkpoint.py configs/smoke.yaml
    python bench/checkpoint.py configs/gpt3-small.yaml model.n_ctx=1024 model.attention=dense
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scalegpt.model import build_model
from scalegpt.train import checkpoint as ckpt
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import to_yaml
from scalegpt.train.engine import build_engine, init_distributed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config, ["train.device=cpu", "train.global_batch=0", "train.micro_batch=1", *args.overrides])
    env = init_distributed(cfg)
    engine = build_engine(cfg, build_model(cfg.model, seed=0), env)
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.model.n_ctx + 1))
    _, loss = engine(x[:, :-1], x[:, 1:])  # one step, so the optimizer state exists
    engine.backward(loss)
    engine.step()
    n_params = sum(p.numel() for p in engine.module.parameters())
    saves, loads, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        cfg.checkpoint.keep = 1
        for i in range(args.repeats):
            state = ckpt.TrainState(step=i + 1, tokens=0, samples=0)
            t0 = time.perf_counter()
            path = ckpt.save(
                engine, state, cfg=cfg, config_yaml=to_yaml(cfg), run_dir=run, world_size=1, rank=0, meta={}
            )
            saves.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.iterdir())
            t0 = time.perf_counter()
            ckpt.load(engine, path, universal=False, rank=0, world_size=1)
            loads.append(time.perf_counter() - t0)
    print(
        f"# {args.config} {' '.join(args.overrides)}: {n_params / 1e6:.1f}M parameters, {cfg.train.precision}, "
        f"ZeRO-{cfg.train.zero_stage}, 1 process, torch {torch.__version__}"
    )
    print(
        f"save {statistics.median(saves):.2f} s, load {statistics.median(loads):.2f} s (median of {args.repeats}); "
        f"size {size / 1e6:.1f} MB ({size / n_params:.1f} bytes per parameter)"
    )


if __name__ == "__main__":
    main()
