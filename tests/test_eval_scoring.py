"""Few-shot scoring (train/evaluation/fewshot.py) on hand-computed examples, and the built-in tasks.

The model here is a lookup table: the next token's logits depend only on the current token, so every
log-likelihood is a sum of entries we chose and can work out by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tokenizers import Tokenizer

from scalegpt.model import ModelConfig
from scalegpt.train.data.builtin import arithmetic_example, scramble_example
from scalegpt.train.data.tokenizer import train_bpe
from scalegpt.train.errors import UserError
from scalegpt.train.evaluation.fewshot import (
    FEW,
    Encoder,
    Episode,
    TaskPlan,
    context_text,
    continuation_logprobs,
    episodes,
    exact_match,
    greedy_lines,
    pick_choice,
    plan_task,
    run_setting,
)
from scalegpt.train.evaluation.tasks import (
    ALIASES,
    TASKS,
    Example,
    Task,
    binomial_p_value,
    chance_level,
    get_tasks,
)

from eval_helpers import TableLM, chain_model


def log(x: float) -> float:
    return math.log(x)


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges: one token per character, end-of-text is id 0."""
    return train_bpe(["abc"], 257)


def test_continuation_logprobs_match_hand_computation() -> None:
    # token 0 -> P(1) = 3/6; token 1 -> P(2) = 2/5; token 2 -> uniform over 4
    table = torch.zeros(4, 4)
    table[0, 1] = log(3)
    table[1, 2] = log(2)
    model = TableLM(table)
    got = continuation_logprobs(model, [([0], [1, 2]), ([0, 1], [2]), ([2], [3]), ([1], [3]), ([0], [])])
    assert got[0][0] == pytest.approx(log(3 / 6) + log(2 / 5))
    assert got[0][1] is True  # 1 is the argmax after 0, and 2 after 1
    assert got[1][0] == pytest.approx(log(2 / 5))
    assert got[2][0] == pytest.approx(log(1 / 4))
    assert got[2][1] is False  # a uniform row's argmax is the lowest id, 0, not 3
    assert got[3][0] == pytest.approx(log(1 / 5))
    assert got[3][1] is False
    assert got[4] == (0.0, True)


def test_uniform_row_is_not_greedy_for_a_later_token() -> None:
    model = TableLM(torch.zeros(4, 4))
    (lp, greedy), (lp0, greedy0) = continuation_logprobs(model, [([2], [3]), ([2], [0])])
    assert lp == lp0 == pytest.approx(log(1 / 4))
    assert not greedy and greedy0  # argmax of a tie is the first index


def test_batching_and_padding_do_not_change_scores() -> None:
    torch.manual_seed(0)
    model = TableLM(torch.randn(6, 6))
    rng = random.Random(0)
    reqs = [
        ([rng.randrange(6) for _ in range(rng.randint(1, 9))], [rng.randrange(6) for _ in range(rng.randint(0, 4))])
        for _ in range(20)
    ]
    alone = [continuation_logprobs(model, [r])[0] for r in reqs]
    batched = continuation_logprobs(model, reqs, batch_size=7)
    for (a, ga), (b, gb) in zip(alone, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-6) and ga == gb
    logp = torch.log_softmax(model.table.detach(), -1)
    ctx, cont = reqs[3]
    seq = ctx + cont
    expect = sum(logp[seq[i - 1], seq[i]].item() for i in range(len(ctx), len(seq)))
    assert batched[3][0] == pytest.approx(expect, abs=1e-6)


def test_long_pairs_lose_context_from_the_left() -> None:
    table = torch.zeros(4, 4)
    table[0, 1] = log(3)
    model = TableLM(table, n_ctx=4)
    # 6 tokens: only the last n_ctx + 1 = 5 are fed and predicted; a bigram model cannot tell
    assert continuation_logprobs(model, [([3, 3, 3, 3, 0], [1])])[0][0] == pytest.approx(log(1 / 2))
    with pytest.raises(ValueError, match="n_ctx"):
        continuation_logprobs(model, [([0], [1] * 5)])
    with pytest.raises(ValueError, match="at least one token"):
        continuation_logprobs(model, [([], [1])])


def test_pick_choice_normalizes_per_token() -> None:
    # choice 0: one token of log-prob -1.2; choice 1: three tokens summing to -3.0 (-1.0 per token)
    assert pick_choice([-1.2, -3.0], [1, 3]) == 1
    assert pick_choice([-1.2, -3.0], [1, 3], normalize=False) == 0
    assert pick_choice([-2.0, -1.0, -1.0], [1, 1, 1]) == 1  # ties go to the first


def test_exact_match_ignores_surrounding_whitespace_only() -> None:
    assert exact_match(" 124", [" 124"])
    assert exact_match("124 ", [" 124"])
    assert not exact_match(" 1 24", [" 124"])
    assert not exact_match(" 12", [" 124"])
    assert exact_match(" cab", [" bca", " cab"])


def test_greedy_lines_stop_at_the_newline(byte_tokenizer: Tokenizer) -> None:
    model = chain_model(byte_tokenizer, {"=": " ", " ": "4", "4": "2", "2": "\n", "\n": "x", "?": "7", "7": "7"})
    prompts = [byte_tokenizer.encode("Q: a=").ids, byte_tokenizer.encode("b?").ids]
    got = greedy_lines(model, byte_tokenizer, prompts, max_new_tokens=6)
    assert got == [" 42", "777777"]  # the second never reaches a newline: cut at max_new_tokens


def test_multiple_choice_and_exact_match_end_to_end(byte_tokenizer: Tokenizer) -> None:
    """A model that always continues '=' with ' ab' and then a newline: MC picks ' ab' whatever the
    query, and greedy answers ' ab'; accuracy is then the share of queries whose answer is ' ab'."""
    model = chain_model(byte_tokenizer, {"=": " ", " ": "a", "a": "b", "b": "\n"})
    enc = Encoder(byte_tokenizer)
    queries = [
        Example("x =", (" ab",), (" ab", " ba"), 0),
        Example("y =", (" ba",), (" ab", " ba"), 1),
        Example("z =", (" ab",), (" ba", " ab"), 1),
    ]
    for scoring, metric, chance in (("choice", "acc", 0.5), ("generate", "exact_match", 0.01)):
        task = Task("toy", "toy", scoring, lambda rng: queries[0], baseline=chance)
        plan = TaskPlan(task, [Episode(q, ()) for q in queries], [("0", 0)])
        result = run_setting(model, enc, plan, "0", 0)
        assert result.metric == metric
        assert (result.correct, result.total) == (2, 3)
        assert result.accuracy == pytest.approx(2 / 3)
        assert result.chance == chance
        assert result.p_value == pytest.approx(binomial_p_value(2, 3, chance))


# --- tasks and contexts ------------------------------------------------------------------------------


def test_task_lines_are_corpus_lines() -> None:
    """Demonstrations are in the built-in corpus's formats: same RNG, same line."""
    for name, op, digits in (("2D+", "plus", 2), ("3D-", "minus", 3), ("2Dx", "times", 2)):
        ex = TASKS[name].make(random.Random(5))
        assert ex.line == "".join(arithmetic_example(random.Random(5), op, digits))
    for kind in ("cycle", "anagram1", "anagram2", "insert", "reverse"):
        ex = TASKS[kind].make(random.Random(7))
        assert ex.line == "".join(scramble_example(random.Random(7), kind))
    inv = TASKS["reverse-inverse"].make(random.Random(3))
    word = inv.prompt.removeprefix("Reverse: ").removesuffix(" =")
    assert inv.answers == (f" {word[::-1]}",)
    cyc = TASKS["cycle-inverse"].make(random.Random(3))
    word = cyc.prompt.removeprefix("Cycle: ").removesuffix(" =")
    assert sorted(a.strip() for a in cyc.answers) == sorted({word[k:] + word[:k] for k in range(1, len(word))} - {word})


def test_unscramble_examples_are_scrambled() -> None:
    for name in ("cycle", "anagram1", "anagram2", "insert", "reverse"):
        rng = random.Random(0)
        for _ in range(300):
            ex = TASKS[name].make(rng)
            assert ex.prompt.split(" ", 1)[1].removesuffix(" =") != ex.answer.strip()


def test_choices_hold_the_answer_once() -> None:
    rng = random.Random(0)
    for name in ("mc-2D+", "mc-2D-", "mc-2Dx"):
        for _ in range(200):
            ex = TASKS[name].make(rng)
            assert len(set(ex.choices)) == 4 and ex.choices[ex.label] == ex.answer
    labels = [TASKS["mc-3D+"].make(rng).label for _ in range(2000)]
    assert all(abs(labels.count(i) / 2000 - 0.25) < 0.04 for i in range(4))


def test_demonstrations_never_include_the_query() -> None:
    eps = episodes(TASKS["2D+"], num_examples=50, max_shots=10, seed=1)
    for ep in eps:
        assert len(ep.demos) == 10
        assert all(d.prompt != ep.query.prompt for d in ep.demos)
    assert eps == episodes(TASKS["2D+"], num_examples=50, max_shots=10, seed=1)
    assert eps != episodes(TASKS["2D+"], num_examples=50, max_shots=10, seed=2)
    text = context_text(eps[0].demos[:2], eps[0].query)
    assert text == f"{eps[0].demos[0].line}\n{eps[0].demos[1].line}\n{eps[0].query.prompt}"


def test_encoder_splits_where_the_whole_line_splits() -> None:
    tok = train_bpe([f"Q: What is {a} plus {a}? A: {2 * a}" for a in range(10, 99)] * 3, 300)
    enc = Encoder(tok)
    ctx, cont = enc.pair("Q: What is 12 plus 12? A:", " 24")
    assert ctx[0] == tok.token_to_id("<|endoftext|>")
    assert ctx + cont == [ctx[0], *tok.encode("Q: What is 12 plus 12? A: 24").ids]
    assert tok.decode(cont) == " 24"


def test_few_is_the_most_that_fit_and_too_many_is_an_error() -> None:
    tok = train_bpe(["abc"], 257)  # one token per character, so lengths can be counted by hand
    enc = Encoder(tok)
    task = TASKS["2D+"]
    eps = episodes(task, num_examples=20, max_shots=10, seed=0)

    def need(k: int) -> int:
        """End-of-text + K lines + prompt, then the answer + newline + 1 slack, less the last token."""
        return max(1 + len(context_text(ep.demos[:k], ep.query)) + len(ep.query.answer) + 2 - 1 for ep in eps)

    n_ctx = need(4)
    plan = plan_task(task, enc, n_ctx, shots=[0, 1, FEW], num_examples=20, seed=0, few_max=10)
    assert plan.settings == [("0", 0), ("1", 1), ("few", 4)]
    assert plan.episodes == eps
    plan = plan_task(task, enc, n_ctx, shots=[FEW], num_examples=20, seed=0, few_max=2)
    assert plan.settings == [("few", 2)]
    assert plan_task(task, enc, n_ctx - 1, shots=[FEW], num_examples=20, seed=0).settings == [("few", 3)]
    with pytest.raises(UserError, match=rf"K=5 demonstrations of task 2D\+ .* n_ctx={n_ctx} .* at most K=4 fits"):
        plan_task(task, enc, n_ctx, shots=[5], num_examples=20, seed=0)
    with pytest.raises(UserError, match="K=999"):
        plan_task(task, enc, n_ctx, shots=[999], num_examples=20, seed=0)


def test_task_names_and_aliases() -> None:
    assert [t.name for t in get_tasks(["A1", "2D+", "anagram1"])] == ["anagram1", "2D+"]
    assert len(get_tasks(None)) == len(TASKS) == 17
    with pytest.raises(UserError, match=r"unknown task '2D\*'; valid tasks: 2D\+, 2D-"):
        get_tasks(["2D*"])
    assert set(ALIASES.values()) <= set(TASKS)


def test_chance_levels() -> None:
    assert chance_level("2D+") == pytest.approx(90 / 8100)  # the sum 109 (or any of 99..109's peak)
    assert chance_level("2D-") == pytest.approx(90 / 8100)  # a - b = 0
    assert chance_level("3D+") == pytest.approx(900 / 900**2)
    assert chance_level("mc-2Dx") == 0.25
    assert 1 / 2000 <= chance_level("anagram2") < 1 / 1500


def test_binomial_p_value() -> None:
    assert binomial_p_value(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_p_value(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_p_value(2, 3, 0.5) == pytest.approx(4 / 8)  # P(2) + P(3) = 3/8 + 1/8
    assert binomial_p_value(1, 100, 0.0) == 0.0


@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_shared_context_scoring_equals_scoring_each_pair(attention: str) -> None:
    """Reading a context once into the KV cache gives the scores of running every (context, choice)
    in full, on a real GPT with contexts of several lengths and ragged choice lists."""
    from scalegpt.model import GPT
    from scalegpt.train.evaluation.fewshot import shared_context_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=24, vocab_size=50, attention=attention, local_window=4)
    model = GPT(cfg).eval()
    rng = random.Random(0)
    items = []
    for _ in range(9):
        ctx = [rng.randrange(50) for _ in range(rng.choice([3, 3, 7, 12]))]
        conts = [[rng.randrange(50) for _ in range(rng.randint(0, 5))] for _ in range(rng.randint(1, 4))]
        items.append((ctx, conts))
    items.append(([1] * 22, [[2, 3, 4, 5]]))  # too long for n_ctx with its choice: the fallback drops context
    shared = shared_context_logprobs(model, items, batch_size=5)
    for (ctx, conts), got in zip(items, shared, strict=True):
        expect = continuation_logprobs(model, [(ctx, c) for c in conts])
        assert [g[1] for g in got] == [e[1] for e in expect]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expect], abs=1e-4)
