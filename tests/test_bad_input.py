"""Bad input to every sub-command: one line `scalegpt: error: ...`, exit 2 (130 for an interrupt), and
nothing that existed before the command changed.

Most cases run the real entry point in this process and fail before any training starts: a config
error, an unwritable output, a damaged file. The few that need a training process (a corrupt token
file, a stopped first start, Ctrl-C and kill -9 during `launch`) run it as a user would, in a subprocess
under a time-out, so that a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer

from scalegpt.launch.cli import main
from scalegpt.model import GPT, ModelConfig
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import Config, to_yaml

from conftest import ROOT
from e2e import SMALL_DATA, SMOKE, free_port, like_a_terminal

MODEL = dict(n_layer=1, n_head=2, d_model=32, n_ctx=32, vocab_size=300)
CORPUS = ["the quick brown fox jumps over the lazy dog.", "héllo wörld, naïve café 🙂", "to be or not to be"] * 20


# --- fixtures: one folder of inputs, built once for the module ----------------------------------------
@dataclass
class Inputs:
    """Paths a case's arguments may name as {key}."""

    paths: dict[str, Path] = field(default_factory=dict)

    def fill(self, words: list[str]) -> list[str]:
        return [w.format(**{k: str(v) for k, v in self.paths.items()}) for w in words]


def _export(out: Path, tokenizer: Path) -> Path:
    out.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in GPT(ModelConfig(**MODEL)).state_dict().items()}, str(out / "model.safetensors")
    )
    (out / "config.yaml").write_text(to_yaml(Config(model=ModelConfig(**MODEL))))
    shutil.copy(tokenizer, out / "tokenizer.json")
    return out


def _fake_run(run: Path, data: Path, **changes: str) -> Path:
    """A run directory as training leaves it (config, tokenizer, metrics), with no checkpoint."""
    run.mkdir(parents=True)
    overrides = [f"data.dir={data}", f"run.dir={run}", *SMALL_DATA, *(f"{k}={v}" for k, v in changes.items())]
    (run / "config.yaml").write_text(to_yaml(load_config(SMOKE, overrides)))
    shutil.copy(data / "tokenizer.json", run / "tokenizer.json")
    rows = [{"step": s, "loss": 6.0 - s / 10, "lr": 1e-3, "tokens": s * 2048} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Inputs:
    root = tmp_path_factory.mktemp("bad-input")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        CORPUS, vocab_size=MODEL["vocab_size"], special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok.save(str(root / "tokenizer.json"))
    p: dict[str, Path] = {"tmp": root, "data": prepared, "smoke": Path(SMOKE)}
    p["file"] = root / "a-file"
    p["file"].write_text("not a directory\n")
    p["export"] = _export(root / "export", root / "tokenizer.json")
    p["damaged_export"] = _export(root / "damaged-export", root / "tokenizer.json")
    (p["damaged_export"] / "config.yaml").write_text("model: [1, 2\n  n_layer: {{\n")
    p["typo_export"] = _export(root / "typo-export", root / "tokenizer.json")
    (p["typo_export"] / "config.yaml").write_text("model:\n  n_layer: two\n")
    p["corrupt_weights"] = _export(root / "corrupt-weights", root / "tokenizer.json")
    (p["corrupt_weights"] / "model.safetensors").write_bytes(b"\x00" * 64)
    p["corrupt_tok"] = _export(root / "corrupt-tok", root / "tokenizer.json")
    (p["corrupt_tok"] / "tokenizer.json").write_text("{not json")
    p["no_tok"] = _export(root / "no-tok", root / "tokenizer.json")
    (p["no_tok"] / "tokenizer.json").unlink()
    p["empty_dir"] = root / "empty"
    p["empty_dir"].mkdir()
    p["run"] = _fake_run(root / "run", prepared)
    p["other_run"] = _fake_run(root / "other-run", prepared, **{"run.seed": "7"})
    p["damaged_run"] = _fake_run(root / "damaged-run", prepared)
    (p["damaged_run"] / "config.yaml").write_text("train: {max_steps: [\n")
    p["no_metrics_run"] = _fake_run(root / "no-metrics", prepared)
    (p["no_metrics_run"] / "metrics.jsonl").unlink()
    p["garbage_metrics_run"] = _fake_run(root / "garbage-metrics", prepared)
    (p["garbage_metrics_run"] / "metrics.jsonl").write_text("{\nnot json\n")
    p["stale_latest"] = root / "stale-latest"
    (p["stale_latest"] / "checkpoints").mkdir(parents=True)
    (p["stale_latest"] / "checkpoints" / "latest").write_text("step_000009\n")
    (p["stale_latest"] / "config.yaml").write_text(to_yaml(Config(model=ModelConfig(**MODEL))))
    files = {
        "bad_yaml": "train: {max_steps: [\n",
        "list_yaml": "- 1\n- 2\n",
        "bad_preset": "defaults:\n  model: no-such-size\n",
        "bad_section": "defaults:\n  optim: fast\n",
        "hosts_bad": "node1 gpus=8\n",
        "hosts_dup": "node1 slots=2\nnode1 slots=2\n",
        "hosts_zero": "node1 slots=0\n",
        "hosts_empty": "# nothing\n",
        "long_prompt": "word " * 400 + "\n",
        "blank_prompts": "\n   \n",
    }
    for name, text in files.items():
        p[name] = root / f"{name}.txt"
        p[name].write_text(text)
    p["binary"] = root / "binary.bin"
    p["binary"].write_bytes(b"\xff\xfe\x00\x81" * 64)
    return Inputs(p)


def _digest(root: Path) -> dict[str, str]:
    if root.is_file():
        return {str(root): hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()}


def _snapshot(inputs: Inputs) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("tmp", "data"):
        out.update(_digest(inputs.paths[key]))
    return out


def _assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or removed by a refused command: {changed}"


def _one_error_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("scalegpt: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert message in errors[0], f"{message!r} not in {errors[0]!r}"


# --- the in-process cases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    message: str
    stdin: bytes | None = None

    def param(self) -> object:
        return pytest.param(self, id=self.name)


P = ["prepare", "{smoke}", "data.dir={tmp}/new-data", *SMALL_DATA]
T = ["train", "{smoke}", "--dry-run", "data.dir={data}", *SMALL_DATA]
TR = ["train", "{smoke}", "data.dir={data}", *SMALL_DATA, "train.max_steps=1"]  # fails before starting
L = ["launch", "{smoke}", "data.dir={data}", *SMALL_DATA]
S = ["sample", "{export}", "--device", "cpu", "--max-new-tokens", "2"]
E = ["eval", "{export}", "--device", "cpu", "--tasks", "2D+", "--num-examples", "2", "--val-batches", "0"]
X = ["export", "{export}", "--format", "safetensors"]
PL = ["plan", "{smoke}"]

CASES = [
    # prepare
    Case("prepare-missing-config", ["prepare", "{tmp}/nope.yaml"], "does not exist"),
    Case("prepare-config-is-a-directory", ["prepare", "{tmp}"], "is a directory"),
    Case("prepare-invalid-yaml", ["prepare", "{bad_yaml}"], "is not valid YAML"),
    Case("prepare-yaml-list", ["prepare", "{list_yaml}"], "must hold a mapping"),
    Case("prepare-unknown-preset", ["prepare", "{bad_preset}"], "no preset model/no-such-size.yaml"),
    Case("prepare-preset-section", ["prepare", "{bad_section}"], "presets exist only for"),
    Case("prepare-data-dir-in-proc", [*P, "data.dir=/proc/x"], "data.dir /proc/x cannot be written"),
    Case("prepare-data-dir-under-a-file", [*P, "data.dir={file}/x"], "is a file, not a directory"),
    Case("prepare-unknown-key", [*P, "data.nope=1"], "data.nope in the command line"),
    Case("prepare-unknown-section", [*P, "nope.x=1"], "nope.x in the command line"),
    Case("prepare-two-kinds-of-source", [*P, "data.sources.0.path={file}"], "exactly one of path, hf or builtin"),
    Case("prepare-source-index-out-of-range", [*P, "data.sources.7.weight=1"], "has 3 items"),
    Case("prepare-duplicate-source", [*P, "data.sources.1.name=arithmetic"], "data.sources.1.name in the command line"),
    Case("prepare-nameless-source", [*P, "data.sources.2.name=''"], "every source needs a name"),
    Case("prepare-negative-weight", [*P, "data.sources.0.weight=-1"], "data.sources.0.weight in the command line"),
    Case("prepare-val-fraction", [*P, "data.val_fraction=1.5"], "data.val_fraction"),
    Case("prepare-num-proc", [*P, "data.num_proc=0"], "data.num_proc"),
    Case("prepare-invalid-utf8-policy", [*P, "data.invalid_utf8=maybe"], "data.invalid_utf8"),
    Case("prepare-not-key-value", [*P, "=3"], "is not key=value"),
    Case("prepare-unknown-flag", [*P, "--fast"], "unrecognized arguments: --fast"),
    Case("prepare-wrong-type", [*P, "data.num_proc=two"], "data.num_proc in the command line"),
    # train: the config
    Case("train-n-head-against-command-line", [*T, "model.n_head=5"], "model.n_head in the command line"),
    Case("train-duplicate-source-1", [*T, "data.sources.1.name=arithmetic"], "data.sources.1.name in the command line"),
    Case("train-config-is-a-directory", ["train", "{tmp}", "--dry-run"], "is a directory"),
    Case("train-missing-config", ["train", "{tmp}/nope.yaml"], "does not exist"),
    Case("train-n-layer-zero", [*T, "model.n_layer=0"], "model.n_layer in the command line"),
    Case("train-n-layer-text", [*T, "model.n_layer=abc"], "model.n_layer in the command line"),
    Case("train-vocab-zero", [*T, "model.vocab_size=0"], "model.vocab_size"),
    Case("train-dropout", [*T, "model.dropout=1.5"], "model.dropout"),
    Case("train-attention", [*T, "model.attention=sparse"], "model.attention"),
    Case("train-model-unknown-key", [*T, "model.n_layers=2"], "no such key"),
    Case("train-precision", [*T, "train.precision=fp8"], "train.precision"),
    Case("train-zero-stage", [*T, "train.zero_stage=4"], "train.zero_stage"),
    Case("train-device", [*T, "train.device=tpu"], "train.device"),
    Case("train-max-steps", [*T, "train.max_steps=-1"], "train.max_steps"),
    Case("train-max-steps-float", [*T, "train.max_steps=1.5"], "train.max_steps"),
    Case("train-micro-batch", [*T, "train.micro_batch=0"], "train.micro_batch"),
    Case("train-global-batch", [*T, "train.global_batch=12"], "train.global_batch"),
    Case("train-timeout", [*T, "train.dist_timeout_minutes=0"], "train.dist_timeout_minutes"),
    Case("train-lr", [*T, "optim.lr=-1"], "optim.lr"),
    Case("train-lr-nan", [*T, "optim.lr=nan"], "optim.lr"),
    Case("train-beta1", [*T, "optim.beta1=1.0"], "optim.beta1"),
    Case("train-eps", [*T, "optim.eps=0"], "optim.eps"),
    Case("train-grad-clip", [*T, "optim.grad_clip=-1"], "optim.grad_clip"),
    Case("train-min-lr-ratio", [*T, "schedule.min_lr_ratio=2"], "schedule.min_lr_ratio"),
    Case("train-decay-tokens", [*T, "schedule.decay_tokens=0"], "schedule.decay_tokens"),
    Case("train-ramp-tokens", [*T, "schedule.ramp_tokens=-5"], "schedule.ramp_tokens"),
    Case("train-checkpoint-keep", [*T, "checkpoint.keep=0"], "checkpoint.keep"),
    Case("train-checkpoint-every", [*T, "checkpoint.every=-1"], "checkpoint.every"),
    Case("train-log-every", [*T, "log.every=0"], "log.every"),
    Case("train-eval-batches", [*T, "eval.batches=0"], "eval.batches"),
    Case("train-run-seed-text", [*T, "run.seed=abc"], "run.seed"),
    Case("train-unknown-section", [*T, "trainer.steps=3"], "trainer.steps in the command line"),
    Case("train-value-not-section", [*T, "run.seed.x=3"], "is a value, not a section"),
    # train: outputs that cannot be written
    Case("train-run-dir-under-a-file", [*TR, "run.dir={file}/run"], "is a file, not a directory"),
    Case("train-run-dir-is-a-file", [*TR, "run.dir={file}"], "is a file, not a directory"),
    Case("train-run-dir-in-proc", [*TR, "run.dir=/proc/run"], "run.dir /proc/run cannot be written"),
    # launch
    Case("launch-no-mode", [*L], "say where to run"),
    Case("launch-procs-zero", [*L, "--procs", "0"], "--procs must be at least 1"),
    Case("launch-procs-text", [*L, "--procs", "two"], "invalid int value"),
    Case("launch-procs-and-gpus", [*L, "--procs", "2", "--gpus", "2"], "not allowed with argument"),
    Case("launch-procs-with-nodes", [*L, "--procs", "2", "--nodes", "2"], "--nodes and --gpus-per-node"),
    Case("launch-gpus-on-cpu-config", [*L, "--gpus", "1"], "train.device=cpu"),
    Case("launch-batch-does-not-split", [*L, "--procs", "3", "--dry-run"], "not divisible"),
    Case("launch-master-port", [*L, "--procs", "2", "--master-port", "70000"], "--master-port must be a TCP port"),
    Case("launch-missing-hostfile", [*L, "--hostfile", "{tmp}/hosts"], "does not exist"),
    Case("launch-hostfile-syntax", [*L, "--hostfile", "{hosts_bad}"], "line 1"),
    Case("launch-hostfile-duplicate", [*L, "--hostfile", "{hosts_dup}"], "listed twice"),
    Case("launch-hostfile-zero-slots", [*L, "--hostfile", "{hosts_zero}"], "slots must be at least 1"),
    Case("launch-hostfile-empty", [*L, "--hostfile", "{hosts_empty}"], "lists no hosts"),
    Case("launch-hostfile-torchrun", [*L, "--hostfile", "{hosts_dup}", "--launcher", "torchrun"], "torchrun"),
    Case(
        "launch-slurm-time-with-space",
        [*L, "--slurm", "--gpus-per-node", "2", "--time", "1 day", "--dry-run"],
        "--time",
    ),
    Case(
        "launch-slurm-partition-space",
        [*L, "--slurm", "--gpus-per-node", "2", "--partition", "a b", "--dry-run"],
        "--partition",
    ),
    Case("launch-n-head", [*L, "--procs", "2", "--dry-run", "model.n_head=5"], "model.n_head in the command line"),
    Case("launch-run-dir-under-a-file", [*L, "--procs", "2", "run.dir={file}/run"], "is a file, not a directory"),
    Case("launch-run-dir-in-proc", [*L, "--procs", "2", "run.dir=/proc/run"], "cannot be written"),
    Case("launch-damaged-run-config", [*L, "--procs", "2", "run.dir={damaged_run}"], "is not a valid scalegpt config"),
    Case("launch-other-experiment", [*L, "--procs", "2", "run.dir={other_run}"], "different config"),
    Case("launch-config-is-a-directory", ["launch", "{tmp}", "--procs", "2"], "is a directory"),
    # sample
    Case("sample-invalid-utf8-prompt", [*S, "--prompt", "\udcff\udcfeab"], "--prompt is not valid UTF-8"),
    Case("sample-binary-stdin", [*S], "stdin is not UTF-8", stdin=b"\xff\xfe\x00\x81binary"),
    Case("sample-binary-prompt-file", [*S, "--prompt-file", "{binary}"], "is not UTF-8 text"),
    Case("sample-blank-prompt-file", [*S, "--prompt-file", "{blank_prompts}"], "has no prompts"),
    Case("sample-missing-prompt-file", [*S, "--prompt-file", "{tmp}/none.txt"], "cannot read --prompt-file"),
    Case("sample-prompt-and-file", [*S, "--prompt", "a", "--prompt-file", "{long_prompt}"], "either --prompt"),
    Case("sample-strict-context", [*S, "--prompt-file", "{long_prompt}", "--strict-context"], "context holds 32"),
    Case("sample-temperature", [*S, "--prompt", "a", "--temperature", "-1"], "--temperature"),
    Case("sample-temperature-nan", [*S, "--prompt", "a", "--temperature", "nan"], "--temperature"),
    Case("sample-top-p-zero", [*S, "--prompt", "a", "--top-p", "0"], "--top-p"),
    Case("sample-top-p-above-one", [*S, "--prompt", "a", "--top-p", "1.5"], "--top-p"),
    Case("sample-top-k", [*S, "--prompt", "a", "--top-k", "-1"], "--top-k"),
    Case("sample-max-new-tokens", [*S, "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    Case("sample-num-samples", [*S, "--prompt", "a", "--num-samples", "0"], "--num-samples"),
    Case("sample-max-new-tokens-text", [*S, "--prompt", "a", "--max-new-tokens", "ten"], "invalid int value"),
    Case("sample-device", ["sample", "{export}", "--device", "tpu", "--prompt", "a"], "device"),
    Case("sample-missing-path", ["sample", "{tmp}/none", "--prompt", "a"], "does not exist"),
    Case("sample-path-is-a-file", ["sample", "{file}", "--prompt", "a"], "is a file"),
    Case("sample-empty-dir", ["sample", "{empty_dir}", "--prompt", "a"], "not a run, checkpoint or export"),
    Case("sample-damaged-config", ["sample", "{damaged_export}", "--prompt", "a"], "is not a valid scalegpt config"),
    Case("sample-config-typo", ["sample", "{typo_export}", "--prompt", "a"], "is not a valid scalegpt config"),
    Case("sample-corrupt-weights", ["sample", "{corrupt_weights}", "--prompt", "a"], "not a readable safetensors"),
    Case("sample-corrupt-tokenizer", ["sample", "{corrupt_tok}", "--prompt", "a"], "not a valid tokenizers JSON"),
    Case("sample-no-tokenizer", ["sample", "{no_tok}", "--prompt", "a"], "no tokenizer.json"),
    Case("sample-stale-latest", ["sample", "{stale_latest}", "--prompt", "a"], "not a complete checkpoint"),
    Case("sample-run-without-checkpoint", ["sample", "{run}", "--prompt", "a"], "not a run, checkpoint or export"),
    # eval
    Case("eval-json-under-a-file", [*E, "--json", "{file}/x.json"], "is a file, not a directory"),
    Case("eval-json-in-proc", [*E, "--json", "/proc/x/y.json"], "cannot be written"),
    Case("eval-json-is-a-directory", [*E, "--json", "{tmp}"], "is a directory"),
    Case("eval-unknown-task", [*E, "--tasks", "9D+"], "9D+"),
    Case("eval-negative-shots", [*E, "--shots", "-1"], "--shots"),
    Case("eval-text-shots", [*E, "--shots", "many"], "--shots"),
    Case("eval-num-examples", [*E, "--num-examples", "0"], "--num-examples"),
    Case("eval-batch-size", [*E, "--batch-size", "0"], "--batch-size"),
    Case("eval-few-max", [*E, "--few-max", "-1"], "--few-max"),
    Case("eval-val-batches", [*E, "--val-batches", "-1"], "--val-batches"),
    Case("eval-missing-path", ["eval", "{tmp}/none"], "does not exist"),
    Case("eval-damaged-config", ["eval", "{damaged_export}", "--tasks", "2D+"], "is not a valid scalegpt config"),
    Case(
        "eval-corrupt-weights",
        ["eval", "{corrupt_weights}", "--tasks", "2D+", "--shots", "0", "--val-batches", "0"],
        "safetensors",
    ),
    # export
    Case("export-out-under-a-file", [*X, "{file}/out"], "is a file, not a directory"),
    Case("export-out-in-proc", [*X, "/proc/out"], "cannot be written"),
    Case("export-out-not-empty", [*X, "{run}"], "already exists and is not empty"),
    Case("export-out-is-a-file", [*X, "{file}"], "already exists"),
    Case("export-unknown-format", ["export", "{export}", "--format", "onnx", "{tmp}/o"], "invalid choice"),
    Case("export-no-format", ["export", "{export}", "{tmp}/o"], "--format"),
    Case("export-missing-path", ["export", "{tmp}/none", "--format", "hf", "{tmp}/o"], "does not exist"),
    Case("export-damaged-config", ["export", "{damaged_export}", "--format", "hf", "{tmp}/o"], "not a valid scalegpt"),
    Case("export-corrupt-weights", ["export", "{corrupt_weights}", "--format", "hf", "{tmp}/o"], "safetensors"),
    # plan
    Case("plan-missing-config", ["plan", "{tmp}/nope.yaml"], "does not exist"),
    Case("plan-config-is-a-directory", ["plan", "{tmp}"], "is a directory"),
    Case("plan-n-head", [*PL, "model.n_head=5"], "model.n_head in the command line"),
    Case("plan-gpus-text", [*PL, "--gpus", "many"], "invalid int value"),
    Case("plan-unknown-key", [*PL, "model.heads=4"], "no such key"),
    # plot
    Case("plot-missing-run", ["plot", "{tmp}/none"], "does not exist"),
    Case("plot-out-under-a-file", ["plot", "{run}", "--out", "{file}/x.png"], "is a file, not a directory"),
    Case("plot-out-in-proc", ["plot", "{run}", "--out", "/proc/x/curves.png"], "cannot be written"),
    Case("plot-out-is-a-directory", ["plot", "{run}", "--out", "{tmp}"], "is a directory"),
    Case("plot-no-metrics", ["plot", "{no_metrics_run}", "--out", "{tmp}/x.png"], "has no metrics.jsonl"),
    Case("plot-garbage-metrics", ["plot", "{garbage_metrics_run}", "--out", "{tmp}/x.png"], "holds no metrics"),
    # inspect
    Case("inspect-no-steps", ["inspect", "{smoke}", "data.dir={data}"], "--steps"),
    Case("inspect-steps-not-a-range", ["inspect", "{smoke}", "data.dir={data}", "--steps", "5"], "--steps"),
    Case("inspect-steps-backwards", ["inspect", "{smoke}", "data.dir={data}", "--steps", "5:3"], "--steps"),
    Case("inspect-steps-from-zero", ["inspect", "{smoke}", "data.dir={data}", "--steps", "0:3"], "--steps"),
    Case("inspect-missing-config", ["inspect", "{tmp}/nope.yaml", "--steps", "1:2"], "does not exist"),
    Case(
        "inspect-n-head", ["inspect", "{smoke}", "--steps", "1:2", "model.n_head=5"], "model.n_head in the command line"
    ),
    Case(
        "inspect-json-under-a-file",
        ["inspect", "{smoke}", *SMALL_DATA, "data.dir={data}", "--steps", "1:2", "--json", "{file}/x"],
        "is a file",
    ),
    Case("inspect-show", ["inspect", "{smoke}", "data.dir={data}", "--steps", "1:2", "--show", "-1"], "--show"),
    Case(
        "inspect-world-size",
        ["inspect", "{smoke}", "data.dir={data}", "--steps", "1:2", "--world-size", "0"],
        "--world-size",
    ),
    Case("inspect-missing-data", ["inspect", "{smoke}", "data.dir={tmp}/no-data", "--steps", "1:2"], "manifest.json"),
    # the entry point itself
    Case("no-command", [], "required"),
    Case("unknown-command", ["fly"], "invalid choice"),
]
for _extra in (
    Case("plan-gpus-zero", [*PL, "--gpus", "0"], "--gpus"),
    Case("plan-gpu-memory", [*PL, "--gpu-memory", "-1"], "--gpu-memory"),
):
    CASES.append(_extra)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_changes_nothing(
    case: Case, inputs: Inputs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    if case.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin), errors="surrogateescape"))
    before = _snapshot(inputs)
    code = main(inputs.fill(case.argv))
    _, err = capsys.readouterr()
    assert code == 2, err[-3000:]
    _one_error_line(err, case.message)
    _assert_unchanged(before, _snapshot(inputs))


def test_eval_json_is_checked_before_the_evaluation_runs(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(inputs.fill([*E, "--num-examples", "100", "--json", "{file}/x.json"]))
    out, err = capsys.readouterr()
    assert code == 2 and "evaluating" not in out  # the weights were never loaded
    _one_error_line(err, "--json")


# --- issue 26: faults that once gave a traceback, or nothing ---------------------------------------------
# Each item under 6 and 7 of issue 26, plus a token file rewritten after prepare and the leftovers of an
# interrupted export. Disk full is made on a small tmpfs (skipped where this machine cannot mount one).
@contextlib.contextmanager
def _tmpfs(where: Path, size: str):  # noqa: ANN202
    """A tmpfs of `size` mounted at `where`, unmounted afterwards; the test is skipped where mounting fails
    (not root, or a container without the capability)."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {mount.stderr.decode().strip() or 'mount failed'}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def inputs26(inputs: Inputs) -> Inputs:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = inputs.paths
    p["int_parquet"] = p["tmp"] / "numbers.parquet"
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), p["int_parquet"])
    p["int_parquet_yaml"] = p["tmp"] / "int-parquet.yaml"
    p["int_parquet_yaml"].write_text(
        "defaults:\n  model: tiny\n"
        f"data:\n  dir: {p['tmp'] / 'int-data'}\n  sources:\n    - {{name: numbers, path: {p['int_parquet']}}}\n"
    )
    return inputs


CASES_26 = [
    Case("prepare-parquet-text-holds-integers", ["prepare", "{int_parquet_yaml}"], "column 'text' holds int64"),
    Case("train-inject-fault-past-max-steps", [*T, "train.inject_fault=nan@1000", "train.max_steps=2"], "never fire"),
    Case("eval-tasks-without-names", ["eval", "{export}", "--device", "cpu", "--tasks"], "at least one task name"),
    Case("sample-stop-empty", [*S, "--prompt", "a", "--stop", ""], '--stop "" matches everywhere'),
    Case("sample-temperature-inf", [*S, "--prompt", "a", "--temperature", "inf"], "must be >= 0 and finite"),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES_26])
def test_issue_26_input_is_one_error_line(
    case: Case, inputs26: Inputs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    before = _snapshot(inputs26)
    code = main(inputs26.fill(case.argv))
    _, err = capsys.readouterr()
    assert code == 2, err[-3000:]
    _one_error_line(err, case.message)
    _assert_unchanged(before, _snapshot(inputs26))
    assert not (inputs26.paths["tmp"] / "int-data").exists()


def test_a_master_port_in_use_is_refused_before_any_rank_starts(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(inputs.fill([*L, "--procs", "2", "--master-port", str(port), f"run.dir={tmp_path / 'run'}"]))
    _, err = capsys.readouterr()
    assert code == 2, err[-3000:]
    _one_error_line(err, f"--master-port {port} is in use")
    assert "launching" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow  # it trains
def test_a_garbage_checkpoint_checksum_record_is_named_on_resume(
    restarted: Restarted, inputs: Inputs, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(restarted.run, run)
    victim = max((run / "checkpoints").glob("step_*")) / "checksums_rank_0.json"
    victim.write_bytes(b"\x00{garbage")
    before = _digest(run)
    args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA]
    code, _, err = _finish(_scalegpt(*args, "train.max_steps=4", "eval.every=0", "log.every=1"))
    assert code == 2, err[-3000:]
    _one_error_line(err, f"{victim} is corrupt (not valid JSON")
    _assert_unchanged(before, _digest(run))


@pytest.mark.slow  # it trains
def test_a_token_file_rewritten_with_valid_ids_is_refused_by_its_checksum(inputs: Inputs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(inputs.paths["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    victim = data / manifest["sources"][1]["file"]
    tokens = np.memmap(victim, dtype=np.dtype(manifest["dtype"]), mode="r+")
    tokens[1000:1064] = tokens[2000:2064].copy()  # the right size, ids in range: only a checksum can tell
    tokens.flush()
    del tokens
    before = _digest(data)
    run = tmp_path / "run"
    code, _, err = _finish(_scalegpt("train", SMOKE, f"data.dir={data}", f"run.dir={run}", *SMALL_DATA))
    assert code == 2, err[-3000:]
    _one_error_line(err, f"token file {victim} does not match the checksum prepare recorded")
    _assert_unchanged(before, _digest(data))
    assert not run.exists()  # refused before anything was written


@pytest.mark.slow  # it trains
def test_disk_full_during_a_checkpoint_save_keeps_the_earlier_checkpoint(inputs: Inputs, tmp_path: Path) -> None:
    """A checkpoint of the smoke model is 7.4 MB: 12 MB holds the first save and not the second."""
    with _tmpfs(tmp_path / "disk", "12m") as disk:
        run = disk / "run"
        args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA]
        args += ["train.max_steps=2", "checkpoint.every=1", "eval.every=0", "log.every=1"]
        code, out, err = _finish(_scalegpt(*args))
        assert code == 2, err[-3000:]
        _one_error_line(
            err, f"no space left on the device of {run / 'checkpoints'} while saving checkpoint step_000002"
        )
        assert "previous checkpoint step_000001 is intact" in err
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
        assert not (run / "checkpoints" / "step_000002").exists()  # the part written is gone, its space freed
        shutil.copytree(run, tmp_path / "saved")  # off the full disk: the first checkpoint resumes
    args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={tmp_path / 'saved'}", *SMALL_DATA]
    code, out, err = _finish(_scalegpt(*args, "train.max_steps=2", "checkpoint.every=1", "eval.every=0"))
    assert code == 0 and "resum" in out.lower(), err[-3000:]


def test_disk_full_during_export_names_the_folder_and_leaves_nothing(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        (disk / "kept.txt").write_text("was here before\n")
        code = main(inputs.fill([*X, str(disk / "out")]))
        _, err = capsys.readouterr()
        assert code == 2, err[-3000:]
        _one_error_line(err, f"no space left on the device of {disk} while writing the export")
        assert sorted(p.name for p in disk.iterdir()) == ["kept.txt"]  # no OUT_DIR, no temporary folder
        assert (disk / "kept.txt").read_text() == "was here before\n"


@pytest.mark.slow  # a real prepare on a small tmpfs
def test_disk_full_during_prepare_names_data_dir_and_keeps_the_prepared_data(tmp_path: Path) -> None:
    small = ["data.sources.0.builtin_mb=0.05", "data.sources.1.builtin_mb=0.05", "data.sources.2.builtin_mb=0.05"]
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        data = disk / "data"
        code, _, err = _finish(_scalegpt("prepare", SMOKE, f"data.dir={data}", *small))
        assert code == 0, err[-3000:]
        before = _digest(data)
        code, _, err = _finish(_scalegpt("prepare", SMOKE, f"data.dir={data}", *SMALL_DATA))
        assert code == 2, err[-3000:]
        _one_error_line(err, f"no space left on the device of {data} while writing the prepared data")
        assert _digest(data) == before  # the sources prepared before are all there, unchanged
        assert not [p.name for p in data.iterdir() if p.name.startswith(".prepare")]


def _export_tmp(parent: Path) -> list[Path]:
    return sorted(parent.glob(".out.export@*"))


@pytest.mark.slow  # a real export, stopped
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_export_removes_its_temporary_folder(inputs: Inputs, tmp_path: Path, sig: int) -> None:
    proc = _scalegpt("export", str(inputs.paths["export"]), "--format", "hf", str(tmp_path / "out"))
    _wait_for(lambda: bool(_export_tmp(tmp_path)), proc)  # written, now being verified by transformers
    os.killpg(proc.pid, sig)
    code, _, err = _finish(proc)
    # 128 + sig, or death by the signal itself after the cleanup (seen for Ctrl-C about one run in four on
    # this machine; the cause is not found): a shell reports both as 128 + sig.
    assert code in (128 + sig, -sig) and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("scalegpt: "), err[-3000:]  # "interrupted" / "terminated"
    assert not _export_tmp(tmp_path) and not (tmp_path / "out").exists()


@pytest.mark.slow  # a real export, killed
def test_the_next_export_removes_what_a_killed_one_left(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = _scalegpt("export", str(inputs.paths["export"]), "--format", "hf", str(tmp_path / "out"))
    _wait_for(lambda: bool(_export_tmp(tmp_path)), proc)
    stale = _export_tmp(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert _export_tmp(tmp_path) == stale  # kill -9 leaves it: nothing runs on the way out
    assert main(inputs.fill([*X, str(tmp_path / "other")])) == 0
    _, err = capsys.readouterr()
    assert not _export_tmp(tmp_path) and f"removed {stale[0]}" in err
    assert (tmp_path / "other" / "model.safetensors").is_file()


def _rank(launcher: subprocess.Popen[str], rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank) and "train" in child.cmdline():
                return child
    raise AssertionError(f"no rank {rank} under the launcher")


@pytest.mark.slow  # it trains
def test_a_dying_rank_s_peer_exits_with_one_line(inputs: Inputs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _scalegpt(
        "launch", SMOKE, "--procs", "2", "--master-port", str(free_port()),
        f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA, "train.max_steps=1000",
        "eval.every=0", "checkpoint.every=0", "log.every=1",
    )  # fmt: skip
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, proc)
    _rank(proc, 1).kill()  # kill -9: it says nothing; its peer is in a collective with it
    code, _, err = _finish(proc)
    assert code != 0 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("scalegpt: error: ")]
    assert len(lines) == 1 and "rank 0 stopped because another rank of this job stopped" in lines[0], err[-3000:]


@pytest.mark.slow  # it trains
def test_the_watchdog_speaks_once_for_a_launched_job(inputs: Inputs, tmp_path: Path) -> None:
    proc = _scalegpt(
        "launch", SMOKE, "--procs", "2", "--master-port", str(free_port()),
        f"data.dir={inputs.paths['data']}", f"run.dir={tmp_path / 'run'}", *SMALL_DATA, "train.max_steps=3",
        "eval.every=0", "train.inject_fault=hang@2", "train.step_timeout_s=20",
    )  # fmt: skip
    code, out, err = _finish(proc)
    assert code == 3, err[-3000:]
    assert (out + err).count("made no progress for 20 s") == 1 and "Traceback" not in err, err[-3000:]
    assert "stopped because another rank" not in err  # the peers' exits are part of the same hang


# --- cases that need a real process ----------------------------------------------------------------------
def _scalegpt(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "scalegpt", *args],
        cwd=ROOT,
        env=full,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a signal to the group reaches every rank, as Ctrl-C does
        preexec_fn=like_a_terminal,
        **kw,  # type: ignore[arg-type]
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _shm(port: int | None = None) -> set[str]:
    """DeepSpeed's CPU allreduce buffers (deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK), of one port when
    given: other jobs on this machine may hold their own."""
    shm = Path("/dev/shm")
    names = {p.name for p in shm.iterdir() if p.name.startswith("deepspeed")} if shm.is_dir() else set()
    return {n for n in names if f"_{port}_" in n} if port is not None else names


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, (
            f"exited {proc.returncode} early:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}"
        )
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


@pytest.mark.slow
def test_token_ids_beyond_the_vocabulary_are_named_as_corruption(inputs: Inputs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(inputs.paths["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    victim = data / manifest["sources"][1]["file"]
    tokens = np.memmap(victim, dtype=np.dtype(manifest["dtype"]), mode="r+")
    tokens[100:110] = int(manifest["vocab_size"]) + 3  # the right size, the wrong contents
    tokens.flush()
    del tokens
    before = _digest(data)
    code, _, err = _finish(_scalegpt("train", SMOKE, f"data.dir={data}", f"run.dir={tmp_path / 'run'}", *SMALL_DATA))
    assert code == 2
    _one_error_line(err, f"token file {victim} is corrupt")
    _assert_unchanged(before, _digest(data))


@pytest.mark.slow
def test_a_damaged_run_config_is_named_by_train(inputs: Inputs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(inputs.paths["damaged_run"], run)
    before = _digest(run)
    code, _, err = _finish(
        _scalegpt(
            "train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA, "train.max_steps=1"
        )
    )
    assert code == 2
    _one_error_line(err, f"{run / 'config.yaml'} is not a valid scalegpt config")
    _assert_unchanged(before, _digest(run))


@dataclass(frozen=True)
class Restarted:
    run: Path
    code: int
    err: str
    extensions: Path
    new_shm: set[str]


@pytest.fixture(scope="module")
def restarted(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Restarted:
    """A stopped first start: a fresh torch extensions cache, a first `train` stopped with SIGTERM while
    DeepSpeed is being set up (where a JIT op build would hold a lock in that cache), then the same
    command again, under a time-out. Its run (2 steps, saved) serves the corrupt-checkpoint cases too."""
    root = tmp_path_factory.mktemp("restart")
    env = {"TORCH_EXTENSIONS_DIR": str(root / "extensions")}
    args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={root / 'run'}", *SMALL_DATA]
    args += ["train.max_steps=2", "eval.every=0", "log.every=1"]
    shm = _shm()
    first = _scalegpt(*args, env=env)
    time.sleep(3)
    os.killpg(first.pid, signal.SIGTERM)
    _finish(first)
    code, _, err = _finish(_scalegpt(*args, env=env), timeout=180)
    return Restarted(root / "run", code, err, root / "extensions", _shm() - shm)


@pytest.mark.slow
def test_a_stopped_first_start_does_not_make_the_next_one_hang(restarted: Restarted) -> None:
    assert restarted.code == 0, restarted.err[-3000:]
    assert not list(restarted.extensions.rglob("lock"))
    assert not restarted.new_shm


def _flip_tensor_bytes(archive: Path) -> None:
    """Make the first float of the largest tensor in a torch zip enormous: still a valid archive."""
    import struct
    import zipfile

    with zipfile.ZipFile(archive) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(archive, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + 3)  # the sign and exponent byte
        f.write(b"\x7f")


def _damage_rng(ckpt: Path) -> Path:
    victim = ckpt / "rng_rank_0.pt"
    victim.write_bytes(victim.read_bytes()[:50])
    return victim


def _damage_optimizer(ckpt: Path) -> Path:
    victim = next(ckpt.glob("*_optim_states.pt"))
    _flip_tensor_bytes(victim)
    return victim


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_damage_rng, _damage_optimizer], ids=["truncated-rng", "bit-flipped-optimizer"])
def test_a_corrupt_checkpoint_file_is_named_on_resume(
    damage: Callable[[Path], Path], restarted: Restarted, inputs: Inputs, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(restarted.run, run)
    victim = damage(max((run / "checkpoints").glob("step_*")))
    before = _digest(run)
    args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA]
    code, _, err = _finish(_scalegpt(*args, "train.max_steps=4", "eval.every=0", "log.every=1"))
    assert code == 2, err[-3000:]
    _one_error_line(err, victim.name)
    _assert_unchanged(before, _digest(run))


@pytest.mark.slow
def test_fp16_on_cpu_is_a_clean_error(inputs: Inputs, tmp_path: Path) -> None:
    args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", f"run.dir={tmp_path / 'run'}", *SMALL_DATA]
    code, _, err = _finish(_scalegpt(*args, "train.precision=fp16", "train.device=cpu"))
    assert code == 2, err[-3000:]
    _one_error_line(err, "fp16")


@pytest.mark.slow
def test_a_refused_resume_changes_nothing_and_makes_no_run_dir(inputs: Inputs, tmp_path: Path) -> None:
    """An existing run directory keeps its config.yaml byte for byte; a new one is not created."""
    run = tmp_path / "run"
    shutil.copytree(inputs.paths["run"], run)
    before = _digest(run)
    missing = tmp_path / "no-such-checkpoint"
    args = ["train", SMOKE, f"data.dir={inputs.paths['data']}", *SMALL_DATA, f"checkpoint.resume={missing}"]
    code, _, err = _finish(_scalegpt(*args, f"run.dir={run}", "train.max_steps=3"))
    assert code == 2, err[-3000:]
    _one_error_line(err, str(missing))
    assert _digest(run) == before  # not a file written, changed or removed
    code, _, err = _finish(_scalegpt(*args, f"run.dir={tmp_path / 'new-run'}"))
    assert code == 2 and not (tmp_path / "new-run").exists(), err[-3000:]


@pytest.mark.slow  # a real prepare, stopped
def test_ctrl_c_during_prepare_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    big = ["data.sources.0.builtin_mb=4", "data.sources.1.builtin_mb=4", "data.sources.2.builtin_mb=4"]
    proc = _scalegpt("prepare", SMOKE, f"data.dir={data}", *big)
    _wait_for((data / ".prepare.lock").exists, proc)  # it holds its lock and has a scratch folder
    time.sleep(1)
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGINT)
    code, _, err = _finish(proc)
    assert code == 130, err[-3000:]
    assert err.count("interrupted") == 1 and "Traceback" not in err, err[-3000:]
    _wait_gone(tree, timeout=10)
    left = [p.name for p in data.iterdir() if p.name.startswith(".prepare")] if data.is_dir() else []
    assert not left, left


@pytest.mark.slow
def test_kill_9_early_in_launch_leaves_nothing_in_dev_shm(inputs: Inputs, tmp_path: Path) -> None:
    port = free_port()
    run = tmp_path / "run"
    proc = _scalegpt(
        "launch", SMOKE, "--procs", "2", "--master-port", str(port),
        f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA, "train.max_steps=50",
    )  # fmt: skip
    time.sleep(4)  # the ranks are importing and initializing DeepSpeed
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:  # every process of the job, the launcher's own group included
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    _wait_gone(tree)
    assert not _shm(port)


@pytest.mark.slow
def test_ctrl_c_during_launch_exits_130_and_says_interrupted_once(inputs: Inputs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _scalegpt(
        "launch", SMOKE, "--procs", "2", "--master-port", str(free_port()),
        f"data.dir={inputs.paths['data']}", f"run.dir={run}", *SMALL_DATA, "train.max_steps=1000",
        "eval.every=0", "checkpoint.every=0",
    )  # fmt: skip
    _wait_for((run / "config.yaml").is_file, proc)  # every rank has joined the process group
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole foreground group
    code, _, err = _finish(proc)
    assert code == 130, err[-3000:]
    assert err.count("interrupted") == 1 and "Traceback" not in err, err[-3000:]
    _wait_gone(tree, timeout=5)  # no rank outlives the command


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _running(pid)], "a process of the job outlived it"


# -- issue 26: the ladder's --launch and inspect's step ranges (launchplan) -------------------------------------
LADDER_AND_INSPECT_CASES = [
    Case(
        "ladder-launch-procs-zero",
        ["ladder", "{smoke}", "run.dir={tmp}/ladder", "--launch", "--procs", "0"],
        "--launch --procs must be at least 1, got 0",
    ),
    Case(
        "inspect-steps-past-max-steps",
        ["inspect", "{smoke}", "data.dir={data}", *SMALL_DATA, "--steps", "1:100000000"],
        "goes past the run's last step, train.max_steps=200",
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in LADDER_AND_INSPECT_CASES])
def test_ladder_launch_and_inspect_ranges_are_one_error_line(
    case: Case, inputs: Inputs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    test_bad_input_is_one_error_line_exit_2_and_changes_nothing(case, inputs, capsys, monkeypatch)
    assert not (inputs.paths["tmp"] / "ladder").exists()


def test_inspect_answers_a_billion_steps_from_the_totals(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A range as long as the run allows is counted from the schedule's totals and the sampler's closed
    form: the same figures a step-by-step walk would give, without the walk."""
    out = tmp_path / "report.json"
    steps = 1_000_000_000
    argv = ["inspect", "{smoke}", "data.dir={data}", *SMALL_DATA, f"train.max_steps={steps}"]
    assert main(inputs.fill([*argv, "--steps", f"2:{steps + 1}", "--show", "2", "--json", str(out)])) == 0
    report = json.loads(out.read_text())
    cfg = load_config(SMOKE, [f"train.max_steps={steps}"])
    batch = cfg.train.global_batch  # smoke has no ramp: every step is a full batch
    assert report["sample_ranges"] == [[batch, batch * (steps + 1 - 1)]]
    assert report["samples"] == sum(s["count"] for s in report["sources"].values()) == batch * (steps - 1)
    weights = {s.name: s.weight for s in cfg.data.sources}
    for name, s in report["sources"].items():
        assert abs(s["share"] - weights[name] / sum(weights.values())) < 1e-4, (name, s)
    assert [s["step"] for s in report["shown"]] == [2, steps]
    assert "walked to step" not in capsys.readouterr().err  # nothing was walked step by step
