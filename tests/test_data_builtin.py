"""The built-in corpus: deterministic, sized on demand, in the formats the eval tasks will reuse."""

from __future__ import annotations

import random
import re

import pytest

from scalegpt.train.data import builtin
from scalegpt.train.errors import UserError


@pytest.mark.parametrize("name", list(builtin.DOMAINS))
def test_same_seed_same_text_and_size_on_demand(name: str) -> None:
    a = list(builtin.generate(name, 0.05))
    b = list(builtin.generate(name, 0.05))
    assert a == b
    size = sum(len(d.encode()) + 1 for d in a)
    assert 50_000 <= size < 50_000 + 2_000  # stops right after the budget
    assert all(d and "\n" in d for d in a)  # documents of several lines
    assert list(builtin.generate(name, 0.05, seed=7)) != a
    assert len({*a}) > 0.9 * len(a)  # varied, not one document repeated


def test_domains_differ_and_are_plain_ascii() -> None:
    texts = {n: "\n".join(builtin.generate(n, 0.02)) for n in builtin.DOMAINS}
    assert texts["arithmetic"].startswith("Q: What is ")
    assert re.match(r"(Uncycle|Unscramble|Clean|Reverse): ", texts["scramble"])
    assert " lived in a " in texts["prose"]
    for t in texts.values():
        assert t.isascii()


@pytest.mark.parametrize("op", ["plus", "minus", "times"])
@pytest.mark.parametrize("digits", [2, 3])
def test_arithmetic_example_is_correct(op: str, digits: int) -> None:
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = builtin.arithmetic_example(rng, op, digits)
        m = re.fullmatch(r"Q: What is (\d+) (plus|minus|times) (\d+)\? A:", prompt)
        assert m and m.group(2) == op
        a, b = int(m.group(1)), int(m.group(3))
        assert len(str(a)) == len(str(b)) == digits
        assert answer.startswith(" ")
        assert int(answer) == {"plus": a + b, "minus": a - b, "times": a * b}[op]


def test_arithmetic_lines_in_corpus_are_right() -> None:
    for doc in builtin.generate("arithmetic", 0.02):
        ops = set()
        for line in doc.splitlines():
            a, op, b, result = re.fullmatch(r"Q: What is (\d+) (\w+) (\d+)\? A: (-?\d+)", line).groups()
            ops.add(op)
            assert int(result) == {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        assert len(ops) == 1  # one task per document, like a few-shot context


@pytest.mark.parametrize("kind", list(builtin.SCRAMBLE_KINDS))
def test_scramble_example_inverts(kind: str) -> None:
    rng = random.Random(1)
    vocab = set(builtin.vocabulary())
    for _ in range(200):
        prompt, answer = builtin.scramble_example(rng, kind)
        word = answer.strip()
        assert answer == " " + word and word in vocab
        label, scrambled = re.fullmatch(r"(\w+): (.+) =", prompt).groups()
        assert label + ":" == builtin.SCRAMBLE_KINDS[kind]
        if kind == "reverse":
            assert scrambled == word[::-1]
        elif kind == "cycle":
            assert scrambled in word + word and len(scrambled) == len(word) and scrambled != word
        elif kind == "insert":
            assert re.sub(r"[.,!?;:/\-_ ]", "", scrambled) == word
        else:
            keep = 1 if kind == "anagram1" else 2
            assert sorted(scrambled) == sorted(word)
            assert scrambled[:keep] == word[:keep] and scrambled[-keep:] == word[-keep:]


def test_vocabulary_is_fixed_and_pronounceable() -> None:
    v = builtin.vocabulary()
    assert v == builtin.vocabulary() and len(set(v)) == len(v) == 2000
    assert all(w.isalpha() and w.islower() and 5 <= len(w) <= 10 for w in v)


def test_prose_document_keeps_its_character() -> None:
    doc = builtin.prose_document(random.Random(3))
    name = doc.split(" ", 1)[0]
    assert doc.splitlines()[-1].startswith(f"In the end, {name} was ")


def test_unknown_corpus_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown builtin corpus 'poetry'"):
        next(builtin.generate("poetry", 1.0))
