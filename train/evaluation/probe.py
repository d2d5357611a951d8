"""A small few-shot probe for the trainer's periodic evaluation (eval.fewshot_probe).

Validation loss says the model fits the text; the probe says whether that has turned into in-context
ability yet, the quantity GPT-3 tracks across model sizes (Section 3.9, Figure 3.10). It is cheap:
the episodes and token ids are made once, and each call scores a few dozen examples at K = few.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer
from torch import nn

from ..rundir import TOKENIZER
from .fewshot import FEW, Encoder, TaskPlan, plan_task, run_setting
from .tasks import get_tasks

PROBE_TASKS = ("mc-2D+", "2D+")
"""A likelihood-scored task, which moves early in training, and its exact-match twin, which moves late."""


class FewshotProbe:
    """Callable on the model: {'fewshot/<task>': accuracy} at K = few for each probe task.

    Deterministic, so every rank may run it and get the same numbers (needed under ZeRO-3, where a
    forward pass is collective)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        n_ctx: int,
        *,
        tasks: Sequence[str] = PROBE_TASKS,
        num_examples: int = 32,
        few_max: int = 10,
        seed: int = 0,
        batch_size: int = 32,
    ) -> None:
        self.encoder = Encoder(tokenizer)
        self.batch_size = batch_size
        self.plans: list[TaskPlan] = [
            plan_task(t, self.encoder, n_ctx, shots=[FEW], num_examples=num_examples, seed=seed, few_max=few_max)
            for t in get_tasks(list(tasks))
        ]

    @classmethod
    def for_run(cls, run_dir: str | Path, n_ctx: int) -> FewshotProbe:
        """The probe for a run directory, with the tokenizer the trainer copied there."""
        return cls(Tokenizer.from_file(str(Path(run_dir) / TOKENIZER)), n_ctx)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for plan in self.plans:
            setting, k = plan.settings[0]
            result = run_setting(model, self.encoder, plan, setting, k, batch_size=self.batch_size)
            out[f"fewshot/{plan.task.name}"] = result.accuracy
        return out
