"""`curation.decontaminate.texts`: evaluation examples from a file (a benchmark exported from lm-eval, say),
removed from training text by the paper's Appendix C rule, set as a user sets it and checked in the
decoded token files against the documents built by hand."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.train.data import builtin
from scalegpt.train.data.mixture import read_manifest
from scalegpt.train.data.ngrams import paper_n, words

from helpers import decoded_documents, one_error_line, write_config

KEY = "data.sources.0.curation.decontaminate"
BENCH = [
    "the committee voted on tuesday to extend the northern railway line past the old quarry and into town",
    "a lantern hung from the mast while the crew counted barrels of salted fish below the narrow deck",
    "she argued that every measurement taken before noon had drifted because the instrument was never warmed",
]
SHORT = "seven quiet herons waited"  # shorter than N: one gram, matched whole


def corpus(root: Path) -> list[str]:
    rng = random.Random(3)
    docs = [builtin.prose_document(rng) for _ in range(30)]
    docs[4] = f"{docs[4]} {BENCH[0].capitalize()}. {docs[5]}"  # inside a long document: cut out, the rest kept
    docs[9] = f"Notes. {SHORT}."  # a short document that is all match: dropped
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "bench.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [*BENCH, SHORT]))
    return docs


@pytest.fixture
def config(tmp_path: Path) -> Path:
    corpus(tmp_path)
    source = {"name": "prose", "path": str(tmp_path / "train.jsonl"), "weight": 1.0}
    data = {
        "dir": str(tmp_path / "data"),
        "tokenizer": "gpt2",
        "num_proc": 1,
        "val_fraction": 0.05,
        "sources": [source],
    }
    return write_config(tmp_path / "c.json", data, {"vocab_size": 50257})


def brute_force_matches(docs: list[str], examples: list[str], n: int) -> int:
    """Occurrences of the examples' grams in the documents, counted with tuples of words."""
    grams = set()
    for e in examples:
        w = words(e)
        g = min(n, len(w))
        grams |= {tuple(w[i : i + g]) for i in range(len(w) - g + 1)}
    count = 0
    for d in docs:
        w = words(d)
        for g in {len(x) for x in grams}:
            count += sum(tuple(w[i : i + g]) in grams for i in range(len(w) - g + 1))
    return count


def test_a_file_of_examples_is_cut_out_by_the_papers_rule(config: Path, capsys) -> None:
    root = config.parent
    docs = [json.loads(line)["text"] for line in (root / "train.jsonl").read_text().splitlines()]
    n = paper_n([len(words(t)) for t in [*BENCH, SHORT]])
    assert n == 8  # the 5th percentile of the lengths is under 8 words (SHORT has 4): the paper's least N
    matches = brute_force_matches(docs, [*BENCH, SHORT], n)
    assert matches == len(words(BENCH[0])) - n + 1 + 1  # every 8-gram of the first example, and SHORT whole
    assert main(["prepare", str(config), f"{KEY}.texts=[{root / 'bench.jsonl'}]", f"{KEY}.min_piece=50"]) == 0
    assert f"prose: decontaminated: {matches} matches in 2 of 30 documents" in capsys.readouterr().out
    manifest = read_manifest(root / "data")
    assert manifest is not None
    entry = manifest["sources"][0]
    row = entry["curation"]["decontaminate"]
    assert (row["documents"], row["touched"], row["dropped"], row["pieces"]) == (30, 2, 1, 30)
    texts = entry["settings"]["curation"]["decontaminate"]["texts"]
    assert list(texts) == [str(root / "bench.jsonl")] and len(texts[str(root / "bench.jsonl")]) == 64
    got = decoded_documents(root / "data", "prose")
    untouched = [d for i, d in enumerate(docs) if i not in (4, 9)]
    assert [d for d in got if d in untouched] == untouched  # every other document as it was, in order
    pieces = [d for d in got if d not in untouched]
    assert len(pieces) == 2 and docs[4].startswith(pieces[0]) and docs[4].endswith(pieces[1])
    joined = " ".join(words(" ".join(got)))
    assert " ".join(words(BENCH[0])) not in joined and " ".join(words(SHORT)) not in joined


def test_a_file_that_is_not_there_is_one_line(config: Path, capsys) -> None:
    root = config.parent
    assert main(["prepare", str(config), f"{KEY}.texts=[{root / 'missing.txt'}]"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{KEY}.texts" in line and "missing.txt" in line
    (root / "empty.txt").write_text("\n\n")
    assert main(["prepare", str(config), f"{KEY}.texts=[{root / 'empty.txt'}]"]) == 2
    assert "holds no example" in one_error_line(capsys.readouterr().err)
    assert not (root / "data").exists()
