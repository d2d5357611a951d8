"""A source whose validation split holds no window of n_ctx+1 tokens has no validation loss. The mixture's
val_loss and val_bpb must leave it out and renormalize the other weights, and say so: counting it as 0
(what they once did) reports a figure lower than any source's.

One run, set up as a user would: a YAML data config with two built-in sources and a JSONL source whose
last documents (its validation split) are a few tokens long. The run's own per-source rows, weighted by
hand, are the second computation; `scalegpt eval` on the same checkpoint must agree with it too.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from e2e import metrics, scalegpt

pytestmark = pytest.mark.slow  # every case trains a run

WEIGHTS = {"arithmetic": 0.5, "prose": 0.3, "short": 0.2}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("short-val")
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8 for i in range(38)]
    docs += ["ok.", "no."]  # the last 5% of 40 documents: the validation split, a few tokens
    (root / "short.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = root / "run.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            run: {{dir: {root / "run"}, seed: 5}}
            model: {{n_layer: 1, n_head: 2, d_model: 32, n_ctx: 32, vocab_size: 300}}
            train: {{max_steps: 2, global_batch: 4, micro_batch: 4, device: cpu, precision: fp32}}
            eval: {{every: 1, batches: 2}}
            log: {{every: 1}}
            checkpoint: {{every: 2}}
            data:
              dir: {root / "data"}
              tokenizer: bpe
              tokenizer_sample_mb: 0.1
              val_fraction: 0.05
              num_proc: 1
              sources:
                - {{name: arithmetic, builtin: arithmetic, builtin_mb: 0.04, weight: {WEIGHTS["arithmetic"]}}}
                - {{name: prose, builtin: prose, builtin_mb: 0.04, weight: {WEIGHTS["prose"]}}}
                - {{name: short, path: {root / "short.jsonl"}, weight: {WEIGHTS["short"]}}}
            """
        )
    )
    scalegpt("prepare", str(config))
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    short = next(e for e in manifest["sources"] if e["name"] == "short")
    assert 0 < short["val"]["tokens"] < 33, short  # the premise: a validation split shorter than one window
    proc = scalegpt("train", str(config))
    return root / "run", proc.stdout, proc.stderr


def _by_hand(row: dict[str, float], key: str) -> float:
    present = {n: w for n, w in WEIGHTS.items() if f"{key}/{n}" in row}
    return sum(w * row[f"{key}/{n}"] for n, w in present.items()) / sum(present.values())


def test_the_mixture_figures_leave_the_short_source_out_and_renormalize(run: tuple[Path, str, str]) -> None:
    run_dir, _, _ = run
    rows = [r for r in metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert "val_loss/short" not in r and r["val_left_out"] == "short", r
        for key in ("val_loss", "val_bpb"):
            assert r[key] == pytest.approx(_by_hand(r, key), rel=1e-12), (key, r)
            # the old figure, the short source counted as 0, is 20% lower
            counted_as_zero = sum(w * r.get(f"{key}/{n}", 0.0) for n, w in WEIGHTS.items())
            assert r[key] > counted_as_zero * 1.2


def test_the_run_says_once_which_source_is_left_out(run: tuple[Path, str, str]) -> None:
    _, out, err = run
    warnings = [line for line in (out + err).splitlines() if "left out of the mixture" in line]
    assert len(warnings) == 1 and "'short'" in warnings[0] and "data.val_fraction" in warnings[0], warnings
    val_lines = [line for line in out.splitlines() if "| val_loss" in line]
    assert len(val_lines) == 3 and all(line.endswith("(without short)") for line in val_lines), val_lines


def test_eval_weighs_the_sources_as_the_run_does(run: tuple[Path, str, str], tmp_path: Path) -> None:
    run_dir, _, _ = run
    out = tmp_path / "eval.json"
    args = ["--tasks", "2D+", "--shots", "0", "--num-examples", "1", "--val-batches", "2", "--batch-size", "4"]
    proc = scalegpt("eval", str(run_dir), "--device", "cpu", *args, "--json", str(out))
    figures = json.loads(out.read_text())["validation"]["metrics"]
    assert set(figures) == {"arithmetic", "prose", "mixture"}
    row = {f"{k}/{n}": figures[n][k] for n in ("arithmetic", "prose") for k in ("loss", "bpb")}
    for key in ("loss", "bpb"):
        assert figures["mixture"][key] == pytest.approx(_by_hand(row, key), rel=1e-12)
    assert proc.stdout.count("left out of the mixture") == 1
    # the same windows, the same weights: the trained model's figures are the run's last ones
    last = [r for r in metrics(run_dir) if "val_loss" in r][-1]
    assert figures["mixture"]["loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_a_run_with_no_validation_window_anywhere_is_refused_before_it_writes(
    run: tuple[Path, str, str], tmp_path: Path
) -> None:
    """With every source short there is no figure to give at all: the start refuses, saying what to set."""
    root = run[0].parent
    config = tmp_path / "only-short.yaml"
    text = (root / "run.yaml").read_text().replace(str(root / "run"), str(tmp_path / "run"))
    text = text.replace(str(root / "data"), str(tmp_path / "data"))
    kept = [line for line in text.splitlines() if "builtin:" not in line]
    config.write_text("\n".join(kept) + "\n")
    scalegpt("prepare", str(config))
    proc = scalegpt("train", str(config), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("scalegpt: error: ")]
    assert len(errors) == 1 and "no source has a validation window" in errors[0] and "eval.every=0" in errors[0]
    assert not (tmp_path / "run").exists()
    assert scalegpt("train", str(config), "eval.every=0").returncode == 0  # what the line says to set works
