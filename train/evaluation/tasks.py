"""The built-in few-shot tasks: GPT-3 Section 3.9's synthetic tasks, generated offline from a seed.

Every example is made by the built-in corpus's own generators (train/data/builtin.py), so a task line
is exactly a corpus line: ``prompt + answer``, the answer starting with a space, lines joined by a
newline. A model trained on the built-in corpus is thus tested in the format it saw; a model trained
on anything else meets the format only through its K demonstrations, as in the paper.

- arithmetic, free-form (exact match of the greedy answer): 2D+, 2D-, 3D+, 3D-, 2Dx;
- the same problems as multiple choice (mc-2D+, ...): the right answer among four, the three others
  being the answers to other problems of the same task. The four are then exchangeable to anyone who
  ignores the question, so chance is exactly 1/4, and a model is scored by the likelihood of each
  choice (Section 2.4);
- word unscrambling: cycled letters (CL), anagrams keeping the first and last 1 or 2 letters (A1, A2),
  random insertion (RI) and reversed words (RW);
- the inverse tasks the paper left open: given a word, produce a cycled form of it (any rotation is
  accepted, since the rotation is not determined by the word) or its reversal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

from ..data.builtin import arithmetic_example, scramble, scramble_example, vocabulary
from ..errors import UserError

Scoring = Literal["generate", "choice"]


@dataclass(frozen=True)
class Example:
    """One problem. `answers` are the accepted completions (each starts with a space), the first being
    the reference shown when the example serves as a demonstration; `choices` and `label` are set for
    multiple-choice tasks."""

    prompt: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    label: int = -1

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def line(self) -> str:
        """The example as one corpus line: what a demonstration looks like in the context."""
        return self.prompt + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    scoring: Scoring
    make: Callable[[random.Random], Example]
    """Draws one example; a pure function of the generator's state."""
    baseline: float | None = None
    """Chance accuracy when given; None computes it with chance_level (built-in tasks)."""

    @property
    def chance(self) -> float:
        """Accuracy of answering without reading the question (see `chance_level`)."""
        return chance_level(self.name) if self.baseline is None else self.baseline


# --- arithmetic ------------------------------------------------------------------------------------


def _arithmetic(op: str, digits: int) -> Callable[[random.Random], Example]:
    def make(rng: random.Random) -> Example:
        prompt, answer = arithmetic_example(rng, op, digits)
        return Example(prompt, (answer,))

    return make


def _arithmetic_choice(op: str, digits: int, n_choices: int = 4) -> Callable[[random.Random], Example]:
    """The right answer among the answers of n_choices - 1 other problems of the same task, in random
    order: exchangeable without the question, so chance is 1/n_choices whatever the answer distribution."""

    def make(rng: random.Random) -> Example:
        prompt, answer = arithmetic_example(rng, op, digits)
        choices = {answer}
        while len(choices) < n_choices:
            choices.add(arithmetic_example(rng, op, digits)[1])
        ordered = sorted(choices)
        rng.shuffle(ordered)
        return Example(prompt, (answer,), tuple(ordered), ordered.index(answer))

    return make


# --- word scrambling -------------------------------------------------------------------------------


def _unscramble(kind: str) -> Callable[[random.Random], Example]:
    """Recover a word from its scrambled form (the corpus's format). Draws where the scramble left the
    word unchanged (a 5-letter word under A2 has one letter to shuffle) are redrawn: they test copying."""

    def make(rng: random.Random) -> Example:
        while True:
            prompt, answer = scramble_example(rng, kind)
            if prompt.split(" ", 1)[1][: -len(" =")] != answer[1:]:
                return Example(prompt, (answer,))

    return make


def _rotations(word: str) -> tuple[str, ...]:
    """Every rotation of word that differs from it, once each."""
    return tuple(dict.fromkeys(r for k in range(1, len(word)) if (r := word[k:] + word[:k]) != word))


def _make_cycle(rng: random.Random) -> Example:
    """Given a word, produce a cycled form of it: every proper rotation is right, the one the corpus's
    generator drew is the reference."""
    word = rng.choice(vocabulary())
    reference = scramble(rng, word, "cycle")
    rest = tuple(f" {r}" for r in _rotations(word) if r != reference)
    return Example(f"Cycle: {word} =", (f" {reference}", *rest))


def _make_reverse(rng: random.Random) -> Example:
    """Given a word, produce its reversal: the corpus's "Reverse:" line read the other way round."""
    while True:
        word = rng.choice(vocabulary())
        if word != word[::-1]:
            prompt, answer = scramble_example(rng, "reverse", word=word[::-1])  # "Reverse: word =", " drow"
            return Example(prompt, (answer,))


# --- the registry ----------------------------------------------------------------------------------


_ARITHMETIC_SPECS: dict[str, tuple[str, int, str]] = {
    "2D+": ("plus", 2, "2-digit addition"),
    "2D-": ("minus", 2, "2-digit subtraction"),
    "3D+": ("plus", 3, "3-digit addition"),
    "3D-": ("minus", 3, "3-digit subtraction"),
    "2Dx": ("times", 2, "2-digit multiplication"),
}
"""Paper name (Section 3.9) -> (operation, digits, description)."""


def _build() -> dict[str, Task]:
    tasks: list[Task] = []
    for name, (op, digits, what) in _ARITHMETIC_SPECS.items():
        tasks.append(Task(name, f"{what}, exact match", "generate", _arithmetic(op, digits)))
    for name, (op, digits, what) in _ARITHMETIC_SPECS.items():
        tasks.append(Task(f"mc-{name}", f"{what}, choice of 4", "choice", _arithmetic_choice(op, digits)))
    tasks += [
        Task("cycle", "CL: unscramble cycled letters", "generate", _unscramble("cycle")),
        Task("anagram1", "A1: unscramble, first and last letter kept", "generate", _unscramble("anagram1")),
        Task("anagram2", "A2: unscramble, first and last 2 letters kept", "generate", _unscramble("anagram2")),
        Task("insert", "RI: remove random insertions", "generate", _unscramble("insert")),
        Task("reverse", "RW: unreverse a word", "generate", _unscramble("reverse")),
        Task("cycle-inverse", "CL inverse: cycle a word's letters", "generate", _make_cycle),
        Task("reverse-inverse", "RW inverse: reverse a word", "generate", _make_reverse),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _build()
"""Every built-in task, by name, in table order."""

ALIASES: dict[str, str] = {"CL": "cycle", "A1": "anagram1", "A2": "anagram2", "RI": "insert", "RW": "reverse"}
"""The paper's abbreviations (Section 3.9) for the unscrambling tasks."""


def get_tasks(names: list[str] | None) -> list[Task]:
    """Tasks by name (None or empty: all), in the order given. An unknown name is a UserError that lists
    the valid ones."""
    if not names:
        return list(TASKS.values())
    out: list[Task] = []
    for name in names:
        key = ALIASES.get(name, name)
        if key not in TASKS:
            raise UserError(
                f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} "
                f"(aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())})"
            )
        if TASKS[key] not in out:
            out.append(TASKS[key])
    return out


def queries(task: Task, num_examples: int, seed: int) -> list[Example]:
    """The task's first num_examples queries for this seed, the ones `scalegpt eval --seed` scores (its
    test set, which decontamination removes from training text); a longer list starts with a shorter one."""
    rng = random.Random(f"{seed}/{task.name}/queries")
    return [task.make(rng) for _ in range(num_examples)]


def _majority_arithmetic(op: str, digits: int) -> float:
    """Probability of the most frequent answer, by enumerating every operand pair (arithmetic_example
    draws both operands uniformly from the d-digit numbers)."""
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    a = np.arange(lo, hi + 1, dtype=np.int64)
    table = {"plus": np.add, "minus": np.subtract, "times": np.multiply}[op].outer(a, a)
    return float(np.unique(table, return_counts=True)[1].max() / table.size)


def _can_change(word: str, kind: str) -> bool:
    """Whether scrambling `word` this way can give another string (the tasks redraw when it does not)."""
    if kind in ("anagram1", "anagram2"):
        keep = 1 if kind == "anagram1" else 2
        return len(set(word[keep:-keep])) > 1
    if kind in ("reverse", "reverse-inverse"):
        return word != word[::-1]
    return len(set(word)) > 1


@cache
def chance_level(name: str) -> float:
    """What a model scores without reading the question.

    Multiple choice: 1/number of choices, exactly (the choices are exchangeable). Free-form: the majority
    baseline, i.e. the accuracy of always giving the most frequent answer. Arithmetic: exact, by
    enumeration (2D+: P(sum = 109) = 90/8100 = 1.1%). Words: answers are vocabulary words drawn
    uniformly among those the scramble can change, so 1/(their number), about 1/2000."""
    task = TASKS[name]
    if task.scoring == "choice":
        return 1.0 / len(task.make(random.Random(0)).choices)
    if name in _ARITHMETIC_SPECS:
        op, digits, _ = _ARITHMETIC_SPECS[name]
        return _majority_arithmetic(op, digits)
    kind = name.removesuffix("-inverse") if name == "cycle-inverse" else name
    return 1.0 / sum(_can_change(w, kind) for w in vocabulary())


def binomial_p_value(correct: int, total: int, chance: float) -> float:
    """One-sided exact binomial test: P(at least `correct` of `total` right | each right with p=chance)."""
    if total == 0:
        return 1.0
    if chance <= 0.0:
        return 0.0 if correct > 0 else 1.0
    if chance >= 1.0:
        return 1.0
    log_p, log_q = math.log(chance), math.log1p(-chance)
    terms = [
        math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1) + k * log_p + (total - k) * log_q
        for k in range(correct, total + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
