"""What a ladder produces, as types that the fits, the figure and the command all read: each rung's state
on disk (Outcome), the fitted power laws (PowerLaw) and the fits of one frontier (GroupFit)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ...train.checkpoint import find_latest
from ...train.rundir import SBATCH, metrics_rows
from .plan import RungInfo

LADDER_JSON = "ladder.json"
LADDER_PNG = "ladder.png"

CAVEAT = (
    "These exponents describe these tiny models trained on this data with this recipe; they are not the "
    "GPT-3 paper's (its Figure 3.1 frontier is L = 2.57 * C^-0.048, C in PF-days, for models up to 175B "
    "parameters trained on 300B tokens) and do not predict them."
)


# -- where each rung stands ------------------------------------------------------------------------------
Status = Literal["done", "partial", "submitted", "new"]


@dataclass(frozen=True)
class Outcome:
    """A rung's state on disk, and its validation curve so far."""

    info: RungInfo
    status: Status
    step: int
    """The step of its latest complete checkpoint (0 before the first)."""
    val_loss: float | None
    val_bpb: float | None
    curve: list[tuple[int, float]]
    """(tokens, validation loss) at each evaluation after step 0."""

    @property
    def finished(self) -> bool:
        return self.status == "done" and self.val_loss is not None


def outcome(ladder_dir: Path, info: RungInfo) -> Outcome:
    """Done means the latest complete checkpoint is at the rung's last step, so `scalegpt train` would
    find nothing to do; its last record then holds the final validation loss."""
    run_dir = ladder_dir / info.dir
    latest = find_latest(run_dir)
    step = latest.step if latest is not None and latest.complete and latest.step is not None else 0
    records = metrics_rows(run_dir)[0] if step else []
    curve = [(int(r["tokens"]), float(r["val_loss"])) for r in records if _num(r.get("val_loss")) and r.get("tokens")]
    final = next((r for r in records if r["step"] == info.steps), {})
    if step >= info.steps:
        status: Status = "done"
    elif (run_dir / SBATCH).is_file():
        status = "submitted"
    else:
        status = "partial" if step else "new"
    loss, bpb = final.get("val_loss"), final.get("val_bpb")
    return Outcome(info, status, step, float(loss) if _num(loss) else None, float(bpb) if _num(bpb) else None, curve)


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class PowerLaw:
    """A fitted L(x) = a * x^(-b) + c (c = 0 for the plain form), with the exponent's standard error."""

    form: Literal["power", "power+offset"]
    a: float
    b: float
    c: float
    b_err: float | None
    """One standard error of b; None when no degree of freedom is left (as many points as parameters)."""
    r2: float
    """Coefficient of determination of log L."""
    points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=float), -self.b) + self.c

    def formula(self, var: str = "C") -> str:
        err = f" ± {self.b_err:.3f}" if self.b_err is not None else ""
        offset = ""
        if self.form == "power+offset":
            offset = f" + {self.c:.3g}" if self.c > 0 else " + 0 (the floor c went to its bound)"
        return f"L = {self.a:.3g}·{var}^-({self.b:.4f}{err}){offset}, R² = {self.r2:.3f}"

    def to_json(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "b_err": self.b_err,
            "r2": self.r2,
            "points": self.points,
        }


@dataclass(frozen=True)
class GroupFit:
    """The fits of one frontier: the whole ladder, or one --axis value."""

    axis_value: str | None
    points: int
    loss_vs_compute: list[PowerLaw]
    loss_vs_params: list[PowerLaw]
    bpb_vs_compute: list[PowerLaw]
    loss_falls_with_size: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "axis_value": self.axis_value,
            "points": self.points,
            "loss_vs_compute": [f.to_json() for f in self.loss_vs_compute],
            "loss_vs_params": [f.to_json() for f in self.loss_vs_params],
            "bpb_vs_compute": [f.to_json() for f in self.bpb_vs_compute],
            "loss_falls_with_size": self.loss_falls_with_size,
            "note": self.note,
        }
