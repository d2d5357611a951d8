"""The lm-evaluation-harness adapter (train/evaluation/harness.py): its three request types on
hand-computed examples with fake requests, then, when lm-eval is installed, a real lm-eval run on
local task files (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from scalegpt.launch.cli import main
from scalegpt.train.data.tokenizer import train_bpe
from scalegpt.train.evaluation.harness import HAVE_LM_EVAL, ScalegptLM, run_lm_eval

from eval_helpers import TableLM, chain_model, tiny_world

V = 257  # byte-level tokenizer without merges: 256 bytes + end-of-text (id 0)
UNIFORM = math.log(1 / V)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(["abc"], V)


def req(*args: object) -> SimpleNamespace:
    """Stands in for lm_eval.api.instance.Instance, of which the adapter reads only .args."""
    return SimpleNamespace(args=args)


def test_loglikelihood_counts_each_continuation_token(tok: Tokenizer) -> None:
    lm = ScalegptLM(model=TableLM(torch.zeros(V, V)), tokenizer=tok)  # uniform: log(1/257) per token
    got = lm.loglikelihood([req("xy", "ab"), req("x = ", "ab"), req("", "abc")])
    assert got[0] == (pytest.approx(2 * UNIFORM), False)
    assert got[1][0] == pytest.approx(3 * UNIFORM)  # the context's trailing space moves: " ab"
    assert got[2][0] == pytest.approx(3 * UNIFORM)  # an empty context is end-of-text
    model = chain_model(tok, {"=": " ", " ": "a", "a": "b"}, strength=5.0)
    (lp, greedy), (lp2, greedy2) = ScalegptLM(model=model, tokenizer=tok).loglikelihood(
        [req("x =", " ab"), req("x =", " ba")]
    )
    assert greedy and lp == pytest.approx(3 * math.log(math.exp(5) / (math.exp(5) + V - 1)))
    # " " is likely after "=", "b" unlikely after " ", and "a" after "b" has the uniform 1/257
    assert not greedy2 and lp2 == pytest.approx(lp / 3 + math.log(1 / (math.exp(5) + V - 1)) + UNIFORM)


def test_loglikelihood_rolling_predicts_every_token_once(tok: Tokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog; " * 4  # 180 tokens, n_ctx is 64
    ids = tok.encode(text).ids
    assert len(ids) > 2 * 64
    lm = ScalegptLM(model=TableLM(torch.zeros(V, V), n_ctx=64), tokenizer=tok)
    assert lm.loglikelihood_rolling([req(text), req("")]) == [pytest.approx(len(ids) * UNIFORM), 0.0]
    torch.manual_seed(0)
    bigram = TableLM(torch.randn(V, V), n_ctx=64)  # each token's probability depends on its predecessor
    logp = torch.log_softmax(bigram.table.detach(), -1)
    seq = [0, *ids]
    expect = sum(logp[a, b].item() for a, b in zip(seq, seq[1:], strict=False))
    got = ScalegptLM(model=bigram, tokenizer=tok, batch_size=2).loglikelihood_rolling([req(text)])
    assert got[0] == pytest.approx(expect, rel=1e-5)


def test_generate_until_stops_and_cuts(tok: Tokenizer) -> None:
    model = chain_model(tok, {"=": " ", " ": "4", "4": "2", "2": "\n", "\n": "Q"})
    lm = ScalegptLM(model=model, tokenizer=tok, max_gen_toks=16)
    got = lm.generate_until(
        [
            req("Q: a=", {"until": ["\n"]}),
            req("Q: b=", {"until": "2"}),
            req("Q: c=", {"until": ["\n"], "max_gen_toks": 2}),
            req("Q: d=", {}),  # until defaults to end-of-text; max_gen_toks to 16
        ]
    )
    assert got[:3] == [" 42", " 4", " 4"]
    assert got[3].startswith(" 42\nQ")


def test_a_loaded_model_needs_its_tokenizer() -> None:
    from scalegpt.train.errors import UserError

    with pytest.raises(UserError, match="tokenizer"):
        ScalegptLM(model=TableLM(torch.zeros(4, 4)))
    with pytest.raises(UserError, match="pretrained"):
        ScalegptLM()


TASK_SOURCE = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
"""Where every toy task reads DOCS: a local JSONL file, cached apart, so lm-eval stays offline."""

TASKS = {
    "toy_choice": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "toy_generate": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""",
    "toy_perplexity": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
}
"""One task per request type: what each asks of the model and how it is scored."""


DOCS = [
    {"question": "x =", "choices": [" ab", " ba"], "label": 0, "answer": " ab"},
    {"question": "y =", "choices": [" ba", " ab"], "label": 1, "answer": " ab"},
    {"question": "z =", "choices": [" ab", " ba"], "label": 1, "answer": " ba"},
    {"question": "w =", "choices": [" ba", " bb", " ab"], "label": 2, "answer": " bb"},
]


def write_tasks(root: Path) -> Path:
    """Three local lm-eval tasks over DOCS, one per request type, read offline from a JSONL file."""
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(TASK_SOURCE.format(name=name, data=data, cache=root / "hf") + body)
    return tasks


needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (pip install 'scalegpt[eval]')")


@needs_lm_eval
def test_lm_eval_runs_local_tasks(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real lm_eval.simple_evaluate over three local YAML tasks, one per request type. The model
    answers ' ab' to everything, so accuracy is the share of documents whose answer is ' ab'."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = write_tasks(tmp_path)
    model = chain_model(tok, {"=": " ", " ": "a", "a": "b", "b": "\n"})
    lm = ScalegptLM(model=model, tokenizer=tok)
    results = run_lm_eval(lm, ["toy_choice", "toy_generate", "toy_perplexity"], include_path=str(tasks))
    assert results["toy_choice"]["acc,none"] == pytest.approx(3 / 4)
    assert results["toy_generate"]["exact_match,none"] == pytest.approx(2 / 4)
    rolling = lm.loglikelihood_rolling([req(d["question"]) for d in DOCS])
    words = sum(len(d["question"].split()) for d in DOCS)
    assert results["toy_perplexity"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(rolling) / words))


@needs_lm_eval
def test_eval_command_runs_lm_eval_tasks(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    world = tiny_world(tmp_path_factory)
    tasks, out = write_tasks(tmp_path), tmp_path / "r.json"
    argv = ["eval", str(world.export), "--lm-eval", "toy_choice", "toy_generate", "--lm-eval-include", str(tasks)]
    assert main([*argv, "--val-batches", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["fewshot"] == []  # --lm-eval alone runs no built-in task
    assert 0.0 <= report["lm_eval"]["toy_choice"]["acc,none"] <= 1.0
    assert 0.0 <= report["lm_eval"]["toy_generate"]["exact_match,none"] <= 1.0
