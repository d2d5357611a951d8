"""Results of an evaluation as console tables and wandb tables; per-source epochs for curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..data.mixture import Mixture
from .fewshot import ShotResult
from .tasks import TASKS


class TableLog(Protocol):
    """What log_eval_tables needs of a MetricsLog (train/metrics.py)."""

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None: ...


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in pairs)

    return [line(header), *(line(r) for r in rows)]


def fewshot_table(results: Sequence[ShotResult]) -> str:
    """One row per task, one column per setting ('0', '1', 'few'), plus chance. A cell is the accuracy;
    'few' cells also give the K used, and a '*' marks p < 0.01 against chance (one-sided binomial)."""
    settings: list[str] = []
    for r in results:
        if r.setting not in settings:
            settings.append(r.setting)
    tasks: list[str] = []
    for r in results:
        if r.task not in tasks:
            tasks.append(r.task)
    cell = {(r.task, r.setting): r for r in results}
    header = ["task", "metric", "chance", *[f"K={s}" for s in settings]]
    rows = []
    for t in tasks:
        first = next(r for r in results if r.task == t)
        row = [t, first.metric, _pct(first.chance)]
        for s in settings:
            r = cell.get((t, s))
            if r is None:
                row.append("-")
                continue
            text = _pct(r.accuracy) + ("*" if r.p_value < 0.01 else " ")
            row.append(f"{text} (K={r.shots})" if s == "few" else text)
        rows.append(row)
    n = results[0].total if results else 0
    note = f"{n} examples per cell; * = above chance at p < 0.01 (one-sided binomial test)"
    return "\n".join([*_grid(header, rows), note])


def validation_table(metrics: dict[str, dict[str, float]]) -> str:
    header = ["source", "loss", "perplexity", "bits/byte", "tokens"]
    rows = [
        [name, f"{m['loss']:.4f}", f"{m['perplexity']:.3f}", f"{m['bpb']:.4f}", f"{int(m['tokens']):,}"]
        for name, m in metrics.items()
    ]
    return "\n".join(_grid(header, rows))


def task_descriptions(names: Sequence[str]) -> str:
    return "\n".join(f"  {n}: {TASKS[n].description}" for n in names if n in TASKS)


def log_eval_tables(
    log: TableLog,
    results: Sequence[ShotResult] = (),
    validation: dict[str, dict[str, float]] | None = None,
    *,
    prefix: str = "eval",
) -> None:
    """The few-shot results and validation metrics as wandb tables through MetricsLog.log_table:
    `<prefix>/fewshot` (one row per task and K) and `<prefix>/validation` (one row per source)."""
    if results:
        log.log_table(f"{prefix}/fewshot", [r.row() for r in results])
    if validation:
        log.log_table(f"{prefix}/validation", [{"source": name, **m} for name, m in validation.items()])


def epochs_elapsed(mixture: Mixture, tokens: int) -> dict[str, float]:
    """Epochs of each source consumed after `tokens` training tokens (n_ctx targets per sample), GPT-3
    Table 2.2's last column over time: `epochs/<source>` keys, ready for a metrics record."""
    used = mixture.consumed(int(tokens) // mixture.n_ctx)
    return {f"epochs/{name}": u["epochs"] for name, u in used.items()}
