"""Metrics on rank 0: metrics.jsonl (one object per step), a console line, and optional wandb."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import Config, to_yaml


class MetricsLog:
    """Appends one JSON object per step to RUN/metrics.jsonl; mirrors them to wandb when enabled.
    Only rank 0 constructs one; other ranks hold None."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._wandb: Any = None
        if cfg.log.wandb:
            self._wandb = _start_wandb(run_dir, cfg)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self._wandb is not None and rows:
            import wandb

            cols = list(rows[0])
            self._wandb.log({name: wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, cfg: Config) -> Any:
    """wandb in offline mode when no API key is configured: it never prompts and never blocks."""
    import wandb

    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    from omegaconf import OmegaConf

    return wandb.init(
        project=cfg.log.wandb_project,
        name=cfg.run.name or run_dir.name,
        dir=str(run_dir),
        config=OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))),
        resume="allow",
        settings=wandb.Settings(silent=True),
    )


def print0(*args: Any, is_main: bool = True, **kwargs: Any) -> None:
    if is_main:
        print(*args, **kwargs, flush=True)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
