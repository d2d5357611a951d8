"""Few-shot evaluation as in GPT-3 Section 2.4: K demonstrations in the context, no gradient update.

The context of a query is the end-of-text token (every training document follows one), then K
demonstrations of the task, then the query's prompt, joined by newlines as the built-in corpus joins
its lines. Two ways of scoring, as in the paper:

- multiple choice: the log-likelihood of each choice given the context, divided by its number of
  tokens (per-token normalization, Section 2.4); the highest wins. The unnormalized sum is reported too.
- free form: greedy decoding until a newline, compared with the accepted answers by exact match
  (surrounding whitespace ignored).

K = "few" means as many demonstrations as fit in n_ctx for every query of the task, capped at
`few_max`. The demonstrations are drawn from the task's own examples, never the query itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ...model.generate import generate
from ...model.gpt import KVCache
from ..data.tokenizer import EOT
from ..errors import UserError
from .tasks import Example, Task, binomial_p_value
from .tasks import queries as task_queries

FEW = "few"
Shots = int | Literal["few"]
POOL = 1000
"""Demonstration pool per task: the task's "training set" (Section 2.4), drawn apart from the queries."""


# --- scoring primitives -----------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding would produce the continuation) for each
    (context ids, continuation ids) pair.

    The context must hold at least one token (start it with end-of-text). A pair longer than n_ctx + 1
    loses context from the left; a continuation alone longer than n_ctx is an error."""
    n_ctx: int = model.config.n_ctx
    rows: list[tuple[list[int], int]] = []  # (tokens fed and predicted, continuation length)
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("the context needs at least one token (start it with end-of-text)")
        if len(cont) > n_ctx:
            raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored with n_ctx={n_ctx}")
        rows.append(([*ctx, *cont][-(n_ctx + 1) :], len(cont)))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    was_training = model.training
    model.eval()
    try:
        for a in range(0, len(order), batch_size):
            idx = [i for i in order[a : a + batch_size] if rows[i][1] > 0]
            if not idx:
                continue
            width = max(len(rows[i][0]) for i in idx) - 1
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                seq = rows[i][0]
                x[r, : len(seq) - 1] = torch.tensor(seq[:-1])  # right padding: causal, so harmless
            logp = F.log_softmax(model(x.to(_device(model)))[0].float(), dim=-1)  # (B, T, vocab)
            for r, i in enumerate(idx):
                seq, n = rows[i]
                pos = torch.arange(len(seq) - 1 - n, len(seq) - 1)
                target = torch.tensor(seq[-n:], device=logp.device)
                row = logp[r, pos.to(logp.device)]  # (n, vocab)
                total = row.gather(1, target[:, None]).sum().item()
                out[i] = (total, bool((row.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


Choices = tuple[Sequence[int], Sequence[Sequence[int]]]
"""(context ids, the ids of each continuation): a question and its choices."""


@torch.inference_mode()
def shared_context_logprobs(
    model: nn.Module, items: Sequence[Choices], *, batch_size: int = 32
) -> list[list[tuple[float, bool]]]:
    """continuation_logprobs for several continuations of one context (the choices of a question), reading
    the context once: it is encoded into a KV cache, copied to one row per continuation, and only the
    continuations' tokens are run after it. About n_choices times less work for a long few-shot context.

    Contexts of equal length share a batch (the cache advances every row together); an item too long for
    n_ctx falls back to continuation_logprobs, which drops context from the left."""
    n_ctx: int = model.config.n_ctx
    out: list[list[tuple[float, bool]]] = [[] for _ in items]
    groups: dict[int, list[int]] = {}
    fallback: list[int] = []
    for i, (ctx, conts) in enumerate(items):
        if not ctx:
            raise ValueError("the context needs at least one token (start it with end-of-text)")
        if len(ctx) + max((len(c) for c in conts), default=0) - 1 > n_ctx:
            fallback.append(i)
        else:
            groups.setdefault(len(ctx), []).append(i)
    for i in fallback:
        out[i] = continuation_logprobs(model, [(items[i][0], c) for c in items[i][1]], batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        for members in groups.values():
            per_batch = max(1, batch_size // max(1, max(len(items[i][1]) for i in members)))
            for a in range(0, len(members), per_batch):
                idx = members[a : a + per_batch]
                for i, scores in zip(idx, _score_shared_batch(model, [items[i] for i in idx]), strict=True):
                    out[i] = scores
    finally:
        model.train(was_training)
    return out


def _score_shared_batch(model: nn.Module, batch: Sequence[Choices]) -> list[list[tuple[float, bool]]]:
    """shared_context_logprobs for contexts of one length: each context fills one cache row, which is
    then copied to n_rows rows, one per continuation (ragged choice lists padded)."""
    device = _device(model)
    n_rows = max(len(conts) for _, conts in batch)
    cache = KVCache.empty(model.config, len(batch) * n_rows, device=device, dtype=next(model.parameters()).dtype)
    ctx = torch.tensor([list(c) for c, _ in batch], device=device)
    first = F.log_softmax(model(ctx, cache=cache)[0][:, -1].float(), dim=-1)  # (B, vocab)
    cache.k[:, : len(batch) * n_rows] = cache.k[:, : len(batch)].repeat_interleave(n_rows, dim=1)
    cache.v[:, : len(batch) * n_rows] = cache.v[:, : len(batch)].repeat_interleave(n_rows, dim=1)
    rest = _continuations_after_cache(model, cache, batch, n_rows)
    out = []
    for r, (_, conts) in enumerate(batch):
        scores = []
        for j, c in enumerate(conts):
            if not c:
                scores.append((0.0, True))
                continue
            target = torch.tensor(list(c), device=device)
            rows = first[r : r + 1]
            if len(c) > 1 and rest is not None:
                rows = torch.cat([rows, rest[r * n_rows + j, : len(c) - 1]])  # (len(c), V)
            total = rows.gather(1, target[:, None]).sum().item()
            scores.append((total, bool((rows.argmax(-1) == target).all())))
        out.append(scores)
    return out


def _continuations_after_cache(
    model: nn.Module, cache: KVCache, batch: Sequence[Choices], n_rows: int
) -> torch.Tensor | None:
    """Log-probabilities after each continuation token but the last, (B*n_rows, width-1, V), run on the
    cached contexts; None when every continuation has at most one token (the context predicts it)."""
    width = max((len(c) for _, conts in batch for c in conts), default=0)
    if width <= 1:
        return None
    x = torch.zeros(len(batch) * n_rows, width - 1, dtype=torch.long)
    for r, (_, conts) in enumerate(batch):
        for j, c in enumerate(conts):
            if len(c) > 1:
                x[r * n_rows + j, : len(c) - 1] = torch.tensor(list(c[:-1]), dtype=torch.long)
    return F.log_softmax(model(x.to(_device(model)), cache=cache)[0].float(), dim=-1)


def pick_choice(logprobs: Sequence[float], lengths: Sequence[int], *, normalize: bool = True) -> int:
    """Index of the most likely choice: highest log-likelihood per token (Section 2.4's normalization)
    or, with normalize=False, highest total. Ties go to the first."""
    scores = [lp / max(n, 1) if normalize else lp for lp, n in zip(logprobs, lengths, strict=True)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def greedy_lines(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuation of each prompt up to its first newline (or end-of-text, or max_new_tokens)."""
    eot = tokenizer.token_to_id(EOT)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        new: list[list[int]] = [[] for _ in idx]

        def at_newline(row: int, token: int, new: list[list[int]] = new) -> bool:
            new[row].append(token)
            return "\n" in tokenizer.decode(new[row])

        generate(
            model,
            [list(prompts[i]) for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eot_id=eot,
            on_token=at_newline,
        )
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(new[r]).split("\n", 1)[0]
    return out


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match after stripping surrounding whitespace (the answers start with a space)."""
    return prediction.strip() in {a.strip() for a in answers}


# --- contexts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """A query and its demonstrations, in order: K shots use the first K."""

    query: Example
    demos: tuple[Example, ...]


def episodes(task: Task, *, num_examples: int, max_shots: int, seed: int) -> list[Episode]:
    """num_examples queries and, for each, max_shots demonstrations drawn from a separate pool of the
    task's examples, none with the query's prompt. A pure function of (task, seed): the same queries and
    demonstrations for every K and every model."""
    queries = task_queries(task, num_examples, seed)
    pool_rng = random.Random(f"{seed}/{task.name}/demonstrations")
    pool = [task.make(pool_rng) for _ in range(max(POOL, 2 * max_shots))]
    out = []
    for i, q in enumerate(queries):
        candidates = [d for d in pool if d.prompt != q.prompt]
        demos = random.Random(f"{seed}/{task.name}/{i}").sample(candidates, max_shots)
        out.append(Episode(q, tuple(demos)))
    return out


def context_text(demos: Sequence[Example], query: Example) -> str:
    """K demonstration lines, then the query's prompt, one per line like a corpus document."""
    return "\n".join([*(d.line for d in demos), query.prompt])


class Encoder:
    """Token ids for contexts and continuations, split where the tokenizer splits the whole line."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        eot = tokenizer.token_to_id(EOT)
        self.prefix: list[int] = [] if eot is None else [eot]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def context(self, text: str) -> list[int]:
        return [*self.prefix, *self.encode(text)]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids). The continuation's ids are those the whole text gets after
        the context's, so scoring sees the tokens training saw; where BPE merges across the boundary,
        the two halves are encoded apart."""
        ctx = self.context(context)
        whole = self.context(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.encode(continuation)


# --- running a task ---------------------------------------------------------------------------------


@dataclass
class ShotResult:
    """One cell of the results table: a task at one K."""

    task: str
    setting: str
    """'0', '1', 'few' or the K asked for."""
    shots: int
    scoring: str
    metric: str
    correct: int
    total: int
    accuracy: float
    chance: float
    p_value: float
    """One-sided binomial test of the accuracy against chance."""
    extra: dict[str, float] = field(default_factory=dict)
    hits: tuple[bool, ...] = field(default=(), repr=False)
    """Whether each query (in the plan's order) was right: what the contamination report splits."""

    def row(self) -> dict[str, object]:
        return {
            "task": self.task,
            "setting": self.setting,
            "shots": self.shots,
            "scoring": self.scoring,
            "metric": self.metric,
            "correct": self.correct,
            "total": self.total,
            "accuracy": self.accuracy,
            "chance": self.chance,
            "p_value": self.p_value,
            **self.extra,
        }


def _reserve(encoder: Encoder, task: Task, ep: Episode) -> int:
    """Tokens the scoring adds after the context: the longest choice, or the generation budget."""
    text = ep.query.prompt
    if task.scoring == "choice":
        return max(len(encoder.pair(text, c)[1]) for c in ep.query.choices)
    return max(len(encoder.pair(text, a)[1]) for a in ep.query.answers) + 2  # + the newline, + slack


@dataclass
class TaskPlan:
    """A task's episodes and the K values to run, checked to fit the context."""

    task: Task
    episodes: list[Episode]
    settings: list[tuple[str, int]]
    """(setting label, K) pairs."""


def plan_task(
    task: Task,
    encoder: Encoder,
    n_ctx: int,
    *,
    shots: Sequence[Shots],
    num_examples: int,
    seed: int,
    few_max: int = 10,
) -> TaskPlan:
    """Resolve "few" to the largest K (at most few_max) whose contexts fit n_ctx for every query, and
    check every explicit K fits: one that does not is a UserError naming K, n_ctx and the largest K that
    fits."""
    explicit = [k for k in shots if k != FEW]
    for k in explicit:
        if not isinstance(k, int) or k < 0:
            raise UserError(f"--shots takes non-negative integers or 'few', got {k!r}")
        if k > n_ctx:
            raise UserError(f"K={k} demonstrations cannot fit in the model's context of n_ctx={n_ctx} tokens")
    max_shots = max([*explicit, few_max if FEW in shots else 0])
    eps = episodes(task, num_examples=num_examples, max_shots=max_shots, seed=seed)
    fits = max_shots
    for ep in eps:
        reserve = _reserve(encoder, task, ep) - 1  # the last token scored is never fed to the model
        for k in range(fits + 1):
            if len(encoder.context(context_text(ep.demos[:k], ep.query))) + reserve > n_ctx:
                fits = k - 1
                break
    if fits < 0:
        raise UserError(f"task {task.name}: even K=0 does not fit the model's context of n_ctx={n_ctx} tokens")
    settings: list[tuple[str, int]] = []
    for k in shots:
        if k == FEW:
            settings.append((FEW, min(fits, few_max)))
            continue
        if k > fits:
            raise UserError(
                f"K={k} demonstrations of task {task.name} do not fit the model's context of n_ctx={n_ctx} "
                f"tokens; at most K={fits} fits (or ask for 'few', the most that fit, up to {few_max})"
            )
        settings.append((str(k), int(k)))
    return TaskPlan(task, eps, settings)


def run_setting(
    model: nn.Module, encoder: Encoder, plan: TaskPlan, setting: str, k: int, *, batch_size: int = 32
) -> ShotResult:
    """Score every episode of a plan with its first k demonstrations."""
    task = plan.task
    texts = [context_text(ep.demos[:k], ep.query) for ep in plan.episodes]
    extra: dict[str, float] = {}
    if task.scoring == "choice":
        items = []
        for text, ep in zip(texts, plan.episodes, strict=True):
            pairs = [encoder.pair(text, c) for c in ep.query.choices]  # the context's ids are the same in each
            items.append((pairs[0][0], [p[1] for p in pairs]))
        scored = shared_context_logprobs(model, items, batch_size=batch_size)
        hits, hits_sum = [], 0
        for (_, conts), scores, ep in zip(items, scored, plan.episodes, strict=True):
            lps, lengths = [s[0] for s in scores], [len(c) for c in conts]
            hits.append(pick_choice(lps, lengths) == ep.query.label)
            hits_sum += pick_choice(lps, lengths, normalize=False) == ep.query.label
        correct, metric = sum(hits), "acc"
        extra["acc_unnormalized"] = hits_sum / len(plan.episodes)
    else:
        prompts = [encoder.context(t) for t in texts]
        budget = max(_reserve(encoder, task, ep) for ep in plan.episodes)
        predictions = greedy_lines(model, encoder.tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
        hits = [exact_match(p, ep.query.answers) for p, ep in zip(predictions, plan.episodes, strict=True)]
        correct, metric = sum(hits), "exact_match"
    total = len(plan.episodes)
    chance = task.chance
    return ShotResult(
        task=task.name,
        setting=setting,
        shots=k,
        scoring=task.scoring,
        metric=metric,
        correct=correct,
        total=total,
        accuracy=correct / total if total else 0.0,
        chance=chance,
        p_value=binomial_p_value(correct, total, chance),
        extra=extra,
        hits=tuple(hits),
    )


def plan_tasks(
    tasks: Sequence[Task],
    tokenizer: Tokenizer,
    n_ctx: int,
    *,
    shots: Sequence[Shots] = (0, 1, FEW),
    num_examples: int = 100,
    seed: int = 1234,
    few_max: int = 10,
) -> list[TaskPlan]:
    """Every task's episodes and K values, checked against n_ctx: needs only the tokenizer, so a K that
    does not fit fails before any weights are loaded."""
    if num_examples < 1:
        raise UserError(f"--num-examples must be at least 1, got {num_examples}")
    encoder = Encoder(tokenizer)
    return [
        plan_task(t, encoder, n_ctx, shots=shots, num_examples=num_examples, seed=seed, few_max=few_max) for t in tasks
    ]


def run_plans(
    model: nn.Module,
    tokenizer: Tokenizer,
    plans: Sequence[TaskPlan],
    *,
    batch_size: int = 32,
) -> list[ShotResult]:
    """Score every planned (task, K), in order."""
    encoder = Encoder(tokenizer)
    return [
        run_setting(model, encoder, plan, setting, k, batch_size=batch_size)
        for plan in plans
        for setting, k in plan.settings
    ]
