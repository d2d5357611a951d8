"""`scalegpt eval --contamination` and `scalegpt prepare`'s decontamination (GPT-3 Section 4, Appendix C).

The report: a corpus with eval queries planted in known places, checked against a brute-force substring
search of the decoded training text; accuracy on clean and dirty queries against a second scoring of the
same queries; the on-disk index reused, and rebuilt for the one source that changed. Decontamination: the
window and piece rules on hand-made documents, decisions per document, and the smoke mixture before (dirty
queries) and after (none), set as a user sets it."""

from __future__ import annotations

import json
import random
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scalegpt.launch.cli import main
from scalegpt.model import GPT
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import to_yaml
from scalegpt.train.data.builtin import prose_document
from scalegpt.train.data.curation import DecontaminateConfig
from scalegpt.train.data.mixture import read_manifest
from scalegpt.train.data.ngrams import WHOLE, WordHasher, example_grams, gram_hashes, paper_n, word_spans, words
from scalegpt.train.data.prepare.decontaminate import Decontaminator
from scalegpt.train.data.tokenizer import EOT, load_tokenizer
from scalegpt.train.evaluation import contamination
from scalegpt.train.evaluation.contamination import INDEX_DIR, build_source_index, index_path
from scalegpt.train.evaluation.fewshot import episodes, plan_tasks, run_plans
from scalegpt.train.evaluation.tasks import TASKS, Example
from scalegpt.train.weights import load_for_inference

from eval_helpers import export_untrained

TASK_NAMES = ("mc-2D+", "reverse")
NUM = 30
SEED = 1234  # scalegpt eval's default --seed: the queries the CLI scores are these
PLANT = {"mc-2D+": {0, 3, 4, 9, 17, 29}, "reverse": {1, 2, 11, 20}}
"""Query indices written verbatim into the training documents."""
SHOUTED = ("mc-2D+", 12)
"""A query planted in other case and punctuation: dirty by Appendix C's words."""
NEAR = {"mc-2D+": (5, 6, 7), "reverse": (5, 6)}
"""Queries planted only in forms that differ in a word: clean."""
PREFIXED = ("reverse", 7)
"""A query planted after another word on its line: dirty (its words are all there, in a row)."""
SPLIT = ("mc-2D+", 8)
"""A query whose prompt ends one document and whose answer starts the next: clean (grams stay in a document)."""
HELD_OUT = ("reverse", 14)
"""A query planted only in the last document, which prepare puts in the validation split: clean."""


def queries(name: str) -> list[Example]:
    return [ep.query for ep in episodes(TASKS[name], num_examples=NUM, max_shots=0, seed=SEED)]


def planted_documents() -> list[str]:
    rng = random.Random(5)
    q = {name: queries(name) for name in TASK_NAMES}
    docs = [prose_document(rng) for _ in range(60)]

    def put(i: int, line: str) -> None:
        lines = docs[i].split("\n")
        lines.insert(rng.randrange(len(lines) + 1), line)
        docs[i] = "\n".join(lines)

    for name, idx in PLANT.items():
        for i in idx:
            put(rng.randrange(50), q[name][i].line)
    name, i = SHOUTED
    put(rng.randrange(50), q[name][i].line.upper().replace("?", "?!").replace(": ", " ::  "))
    for name, idx in NEAR.items():
        for i in idx:
            ex = q[name][i]
            put(rng.randrange(50), ex.line + "5")  # "... A: 19" -> "... A: 195"
            put(rng.randrange(50), ex.prompt)
    name, i = PREFIXED
    put(rng.randrange(50), "Then: " + q[name][i].line)
    name, i = SPLIT
    docs[30] += "\n" + q[name][i].prompt
    docs[31] = q[name][i].answer.strip() + "\n" + docs[31]
    name, i = HELD_OUT
    docs.append(f"{prose_document(rng)}\n{q[name][i].line}")
    return docs


DIRTY = {
    "mc-2D+": PLANT["mc-2D+"] | {SHOUTED[1]},
    "reverse": PLANT["reverse"] | {PREFIXED[1]},
}


@dataclass(frozen=True)
class World:
    root: Path
    config: Path
    data: Path
    export: Path


def _config(root: Path) -> str:
    return textwrap.dedent(
        f"""
        run: {{dir: {root / "run"}, seed: 3}}
        model: {{n_layer: 1, n_head: 2, d_model: 32, n_ctx: 64, vocab_size: 300}}
        train: {{global_batch: 8, micro_batch: 8}}
        data:
          dir: {root / "data"}
          tokenizer: bpe
          tokenizer_sample_mb: 0.1
          val_fraction: 0.02
          num_proc: 1
          sources:
            - {{name: planted, path: {root / "planted.jsonl"}, weight: 0.5}}
            - {{name: prose, builtin: prose, builtin_mb: 0.03, weight: 0.5}}
        """
    )


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def build_world(root: Path) -> World:
    """A prepared data dir (the planted source and generated prose) and an untrained model exported beside
    it, its config naming that data dir: what `scalegpt eval RUN --contamination` reads."""
    root.mkdir(parents=True)
    write_jsonl(root / "planted.jsonl", planted_documents())
    (root / "tiny.yaml").write_text(_config(root))
    assert main(["prepare", str(root / "tiny.yaml")]) == 0
    export_untrained(load_config(root / "tiny.yaml"), root / "data", root / "export")
    return World(root, root / "tiny.yaml", root / "data", root / "export")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("contam") / "world")


def training_text(data: Path) -> dict[str, list[str]]:
    """Each source's train split, decoded whole and cut at end-of-text: the text the run trained on."""
    manifest = read_manifest(data)
    assert manifest is not None
    tok = load_tokenizer(data / "tokenizer.json")
    out = {}
    for e in manifest["sources"]:
        ids = np.fromfile(data / e["file"], dtype=manifest["dtype"])[: e["train"]["tokens"]]
        out[e["name"]] = tok.decode(ids.tolist(), skip_special_tokens=False).split(EOT)
    return out


def brute_force_dirty(data: Path, name: str) -> set[int]:
    """Queries whose whole line, as Appendix C's words, is a substring of a training document's words
    (space-delimited on both sides): computed without hashes or the index."""
    docs = [" " + " ".join(words(d)) + " " for texts in training_text(data).values() for d in texts]
    out = set()
    for i, q in enumerate(queries(name)):
        needle = " " + " ".join(words(q.line)) + " "
        if any(needle in d for d in docs):
            out.add(i)
    return out


def run_eval(world: World, *extra: str, out: Path) -> dict:
    argv = ["eval", str(world.export), "--tasks", *TASK_NAMES, "--shots", "0", "--num-examples", str(NUM)]
    assert main([*argv, "--val-batches", "0", "--device", "cpu", "--contamination", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


# --- words and grams ------------------------------------------------------------------------------------


def test_words_are_appendix_c_words() -> None:
    assert words("Q: What is 12 plus 7? A: 19") == ["q", "what", "is", "12", "plus", "7", "a", "19"]
    assert words("Don't  STOP\tme-now_ok. -- !") == ["dont", "stop", "menowok"]
    text = "Q: What is 12 plus 7? A: 19"
    ws, spans = word_spans(text)
    assert ws == words(text) and [text[a:b] for a, b in spans][-2:] == ["A:", "19"]


def test_paper_n_is_the_5th_percentile_between_8_and_13() -> None:
    assert paper_n([20] * 100) == 13
    assert paper_n([3] * 100) == 8
    assert paper_n([9] * 10 + [30] * 90) == 9  # a tenth of the examples have 9 words: the 5th percentile is 9
    assert paper_n([11] * 10 + [40] * 90) == 11
    assert paper_n([7] * 10 + [12] * 90) == 8


def test_gram_hashes_stay_within_documents() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**63, size=10, dtype=np.uint64)
    whole = gram_hashes(w, 3)
    assert len(whole) == 8 and len(set(whole.tolist())) == 8
    split = gram_hashes(w, 3, [4, 6])  # grams starting at 2 and 3 would cross the boundary
    assert split.tolist() == [*whole[:2].tolist(), *whole[4:].tolist()]
    texts = ["Reverse: olleh = hello", "Clean: h e-l.lo = hello", "", "one two three four five six seven eight nine"]
    got = example_grams(texts, WHOLE)
    assert [(g, len(h)) for g, h in got] == [(3, 1), (4, 1), (0, 0), (9, 1)]  # "e-l.lo" is one word
    alone = [example_grams([t], WHOLE)[0][1].tolist() for t in texts]
    assert [h.tolist() for _, h in got] == alone  # hashed together or apart, the same grams
    got = example_grams([texts[0], texts[3]], 8)
    assert [(g, len(h)) for g, h in got] == [(3, 1), (8, 2)]
    assert got[1][1].tolist() == gram_hashes(WordHasher()(words(texts[3])), 8).tolist()


# --- the report through the CLI -------------------------------------------------------------------------


def test_report_marks_exactly_the_planted_queries(world: World, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = run_eval(world, out=tmp_path / "r.json")
    text = capsys.readouterr().out
    assert "contamination (GPT-3 Section 4" in text and "clean - all" in text
    tasks = {t["task"]: t for t in report["contamination"]["tasks"]}
    for name in TASK_NAMES:
        brute = brute_force_dirty(world.data, name)
        assert brute == DIRTY[name], f"{name}: the planted corpus is not what this test means it to be"
        t = tasks[name]
        assert t["n"] == "whole" and t["examples"] == NUM
        assert t["dirty"] == len(brute) and t["dirty_fraction"] == pytest.approx(len(brute) / NUM)
        assert t["dirty_by_source"] == {"planted": len(brute), "prose": 0}
    assert tasks["mc-2D+"]["gram_words"] == [8] and tasks["reverse"]["gram_words"] == [3]
    index = report["contamination"]["index"]
    assert index["sources"] == ["planted", "prose"] and index["gram_words"] == [3, 8]
    assert all(Path(f).is_file() and Path(f).parent == world.data / INDEX_DIR for f in index["files"])


def test_clean_and_dirty_accuracy_add_up_to_a_second_scoring(world: World, tmp_path: Path) -> None:
    report = run_eval(world, out=tmp_path / "r.json")
    model, tokenizer, cfg = load_for_inference(world.export, device="cpu")
    plans = plan_tasks([TASKS[n] for n in TASK_NAMES], tokenizer, cfg.model.n_ctx, shots=[0], num_examples=NUM)
    scored = {r.task: r.hits for r in run_plans(model, tokenizer, plans)}
    fewshot = {r["task"]: r for r in report["fewshot"]}
    for row in report["contamination"]["results"]:
        name, hits, dirty = row["task"], scored[row["task"]], DIRTY[row["task"]]
        assert row["correct"] == sum(hits) == fewshot[name]["correct"]
        assert row["correct_dirty"] == sum(h for i, h in enumerate(hits) if i in dirty)
        assert row["correct_clean"] == sum(h for i, h in enumerate(hits) if i not in dirty)
        assert row["accuracy"] == pytest.approx(fewshot[name]["accuracy"])
        assert row["clean_accuracy"] == pytest.approx(row["correct_clean"] / (NUM - len(dirty)))
        assert row["dirty_accuracy"] == pytest.approx(row["correct_dirty"] / len(dirty))
        whole = row["clean_accuracy"] * (NUM - len(dirty)) + row["dirty_accuracy"] * len(dirty)
        assert whole == pytest.approx(row["accuracy"] * NUM)
    assert scored["mc-2D+"].count(True) > 0  # chance is 1/4: the split is tested on real hits


def test_index_is_reused_and_rebuilt_for_the_changed_source_only(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = build_world(tmp_path / "copy")
    run_eval(copy, out=tmp_path / "a.json")
    assert "indexing" in capsys.readouterr().out
    files = {p.name: p.stat().st_mtime_ns for p in (copy.data / INDEX_DIR).iterdir()}
    assert len(files) == 4  # 2 sources x gram lengths 3 and 8, and no build folder left behind
    run_eval(copy, out=tmp_path / "b.json")
    assert "indexing" not in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (copy.data / INDEX_DIR).iterdir()} == files

    docs = planted_documents()
    docs[10] += "\n" + queries("reverse")[25].line
    write_jsonl(copy.root / "planted.jsonl", docs)
    assert main(["prepare", str(copy.config)]) == 0
    capsys.readouterr()
    report = run_eval(copy, out=tmp_path / "c.json")
    out = capsys.readouterr().out
    assert "'planted'" in out and "'prose'" not in out
    after = {p.name: p.stat().st_mtime_ns for p in (copy.data / INDEX_DIR).iterdir()}
    assert {n for n in after if n.startswith("prose")} == {n for n in files if n.startswith("prose")}
    assert all(after[n] == files[n] for n in after if n.startswith("prose"))
    assert len(after) == 4, "the planted source's old index files were not replaced"
    tasks = {t["task"]: t for t in report["contamination"]["tasks"]}
    assert tasks["reverse"]["dirty"] == len(DIRTY["reverse"]) + 1 == len(brute_force_dirty(copy.data, "reverse"))


def test_index_split_into_buckets_equals_the_one_bucket_index(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source too big for one bucket in memory is indexed through bucket files: the same sorted array."""
    manifest = read_manifest(world.data)
    assert manifest is not None
    entry = next(e for e in manifest["sources"] if e["name"] == "prose")
    tok = load_tokenizer(world.data / "tokenizer.json")
    args = (np.dtype(manifest["dtype"]), int(manifest["eot_id"]), tok)
    one = tmp_path / "one"
    shutil.copytree(world.data, one, ignore=shutil.ignore_patterns(INDEX_DIR))
    build_source_index(one, entry, [3, 8], *args)
    many = tmp_path / "many"
    shutil.copytree(world.data, many, ignore=shutil.ignore_patterns(INDEX_DIR))
    monkeypatch.setattr(contamination, "_BUCKET_HASHES", 64)  # ~15,000 words: 256 buckets
    build_source_index(many, entry, [3, 8], *args)
    for n in (3, 8):
        a = np.fromfile(index_path(one, entry, n), dtype=np.uint64)
        b = np.fromfile(index_path(many, entry, n), dtype=np.uint64)
        assert len(a) > 1000 and np.array_equal(a, b) and bool((np.diff(a) > 0).all())
    assert sorted(p.name for p in (many / INDEX_DIR).iterdir()) == sorted(p.name for p in (one / INDEX_DIR).iterdir())


def test_bad_input_is_one_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "eval",
        str(world.export),
        "--tasks",
        "reverse",
        "--num-examples",
        "2",
        "--contamination",
        "--val-batches",
        "0",
    ]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalegpt: error: --contamination needs the data the run trained on")
    assert not (tmp_path / INDEX_DIR).exists()


def test_table_reads_like_table_c1(world: World, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = run_eval(world, out=tmp_path / "r.json")
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("contamination (GPT-3"))
    header, rows = lines[at + 1], lines[at + 2 : at + 2 + len(TASK_NAMES)]
    assert re.split(r"\s{2,}", header) == [
        "task",
        "K",
        "N (words)",
        "dirty",
        "all",
        "clean",
        "dirty acc",
        "clean - all",
    ]
    for line, row in zip(rows, report["contamination"]["results"], strict=True):
        cells = re.split(r"\s{2,}", line.strip())
        assert cells[0] == row["task"] and cells[3] == f"{100 * row['dirty_fraction']:.1f}%"
        assert cells[5] == f"{100 * row['clean_accuracy']:.1f}%"


# --- decontamination (scalegpt prepare) -----------------------------------------------------------------


def _cut(doc: str, **settings: int) -> tuple[list[str], Decontaminator]:
    step = Decontaminator.of(DecontaminateConfig(tasks=["reverse"], num_examples=NUM, **settings), "test")
    assert step is not None
    return step.cut(doc), step


def test_a_match_removes_its_window_and_short_pieces() -> None:
    line = queries("reverse")[0].line
    before, after = " ".join(f"w{i:03d}" for i in range(100)), " ".join(f"z{i:03d}" for i in range(100))
    doc = f"{before}\n{line}\n{after}"
    pieces, step = _cut(doc)
    assert len(pieces) == 2 and pieces[0] == doc[: len(pieces[0])] and pieces[1] == doc[-len(pieces[1]) :]
    start, end = doc.index(line), doc.index(line) + len(line)
    assert start - 200 - 5 <= len(pieces[0]) <= start - 200  # 200 characters, widened to a whole word
    assert end + 200 <= len(doc) - len(pieces[1]) <= end + 200 + 5
    assert all(set(p.split()) <= set(doc.split()) for p in pieces)  # whole words only
    assert step.stats.matches == 1 and step.stats.touched == 1 and step.stats.pieces == 2

    near_start = f"a few words\n{line}\n{after}"  # the first piece is under 200 characters: dropped
    pieces, step = _cut(near_start)
    assert len(pieces) == 1 and near_start.endswith(pieces[0]) and "few" not in pieces[0]
    assert step.stats.pieces == 1 and step.stats.dropped == 0
    assert _cut(doc, window=0, min_piece=0)[0] == [before, after]


def test_a_document_in_more_than_max_pieces_pieces_is_dropped() -> None:
    lines = [q.line for q in queries("reverse")[:4]]
    filler = [" ".join(f"f{j}x{i:03d}" for i in range(10)) for j in range(5)]
    doc = "\n".join(x for pair in zip(filler, [*lines, ""], strict=True) for x in pair).strip()
    assert _cut(doc, window=0, min_piece=0)[0] == filler
    pieces, step = _cut(doc, window=0, min_piece=0, max_pieces=4)
    assert pieces == [] and step.stats.dropped == 1


def test_decisions_are_per_document() -> None:
    docs = planted_documents()
    step = Decontaminator.of(DecontaminateConfig(tasks=list(TASK_NAMES), num_examples=NUM), "test")
    assert step is not None
    forward = [step.cut(d) for d in docs]
    shuffled = list(range(len(docs)))
    random.Random(0).shuffle(shuffled)
    again = Decontaminator.of(DecontaminateConfig(tasks=list(TASK_NAMES), num_examples=NUM), "test")
    assert again is not None
    by_index = dict(zip(shuffled, again.cut_many([docs[i] for i in shuffled]), strict=True))  # together, reordered
    assert [by_index[i] for i in range(len(docs))] == forward
    assert sum(p != [d] for p, d in zip(forward, docs, strict=True)) > len(PLANT["mc-2D+"])


CURATE = [
    "data.sources.0.curation.decontaminate.tasks=[2D+,mc-2D+,3D+]",
    "data.sources.1.curation.decontaminate.tasks=[reverse,CL,insert]",
    f"data.sources.0.curation.decontaminate.num_examples={NUM}",
    f"data.sources.1.curation.decontaminate.num_examples={NUM}",
]
SMOKE_TASKS = ["2D+", "mc-2D+", "3D+", "reverse", "cycle", "insert"]


@pytest.mark.slow  # it prepares the smoke mixture twice
def test_decontaminated_smoke_mixture_has_no_dirty_query(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from e2e import SMALL_DATA, SMOKE

    data = tmp_path / "data"
    common = [f"data.dir={data}", *SMALL_DATA]
    assert main(["prepare", SMOKE, *common]) == 0
    export = tmp_path / "export"
    export.mkdir()
    cfg = load_config(SMOKE, common)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in GPT(cfg.model).state_dict().items()}, str(export / "model.safetensors"))
    (export / "config.yaml").write_text(to_yaml(cfg))
    shutil.copy(data / "tokenizer.json", export / "tokenizer.json")
    argv = ["eval", str(export), "--tasks", *SMOKE_TASKS, "--shots", "0", "--num-examples", str(NUM)]
    argv += ["--val-batches", "0", "--contamination", "--json", str(tmp_path / "r.json")]

    assert main(argv) == 0
    before = {t["task"]: t["dirty"] for t in json.loads((tmp_path / "r.json").read_text())["contamination"]["tasks"]}
    assert before["2D+"] > 0 and before["reverse"] > 0 and before["insert"] > 0, before

    prose = data / "prose.bin"
    prose_id = (prose.stat().st_ino, prose.stat().st_mtime_ns)
    capsys.readouterr()
    assert main(["prepare", SMOKE, *common, *CURATE]) == 0
    out = capsys.readouterr().out
    assert "preparing 2 of 3 sources" in out and "arithmetic: decontaminated: " in out
    assert (prose.stat().st_ino, prose.stat().st_mtime_ns) == prose_id
    manifest = read_manifest(data)
    assert manifest is not None
    entries = {e["name"]: e for e in manifest["sources"]}
    for name in ("arithmetic", "scramble"):
        stats = entries[name]["curation"]["decontaminate"]
        assert stats["matches"] > 0 and stats["bytes_kept"] < stats["bytes"]
        assert entries[name]["settings"]["curation"]["decontaminate"]["num_examples"] == NUM
    assert entries["scramble"]["settings"]["curation"]["decontaminate"]["tasks"] == ["reverse", "cycle", "insert"]
    assert "curation" not in entries["prose"]["settings"]

    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())["contamination"]
    assert {t["task"]: t["dirty"] for t in report["tasks"]} == dict.fromkeys(SMOKE_TASKS, 0)
    for name in SMOKE_TASKS:  # a second look, without hashes: no query line is left in the training text
        assert brute_force_dirty(data, name) == set(), name

    capsys.readouterr()
    assert main(["prepare", SMOKE, *common, *CURATE]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_bad_curation_settings_are_one_line(world: World, capsys: pytest.CaptureFixture) -> None:
    manifest = (world.data / "manifest.json").read_bytes()
    for setting, message in (
        ("tasks=[2D+,3D*]", "data.sources.0.curation.decontaminate.tasks: unknown task '3D*'; valid tasks: 2D+"),
        ("num_examples=0", "data.sources.0.curation.decontaminate.num_examples must be at least 1, got 0"),
    ):
        extra = [] if setting.startswith("tasks") else ["data.sources.0.curation.decontaminate.tasks=[2D+]"]
        assert main(["prepare", str(world.config), f"data.sources.0.curation.decontaminate.{setting}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"scalegpt: error: {message}"), err
    assert (world.data / "manifest.json").read_bytes() == manifest
