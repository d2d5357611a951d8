"""`scalegpt curate`: the quality filter's per-document work run on datatrove's executors, local and SLURM (an
sbatch stand-in that runs each array task here, as the launch tests stand in for sbatch), then `scalegpt
prepare` looking the results up. The check is the one that matters: the token files and curation counts are
byte for byte those of a prepare that curated everything itself."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.train.data import builtin
from scalegpt.train.data.mixture import read_manifest

from helpers import one_error_line, write_config

SBATCH = """#!/bin/bash
# An sbatch stand-in: run every array task of the script now, in order, with the variables SLURM sets.
script="${@: -1}"
echo "$@" >> "${0%/*}/sbatch.calls"
range=$(grep -oP '^#SBATCH --array=\\K[0-9]+-[0-9]+' "$script")
for i in $(seq "${range%-*}" "${range#*-}"); do
  SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=77 SLURM_NODELIST=localhost bash "$script" >> "${0%/*}/tasks.log" 2>&1 || exit 1
done
n=$(( $(wc -l < "${0%/*}/sbatch.calls") ))
echo "Submitted batch job $n"
"""
SCONTROL = '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo "$3"\nexit 0\n'


def crawl(path: Path) -> list[str]:
    """A stand-in for raw Common Crawl: generated prose and junk, shuffled, one JSON document a line."""
    docs = [*builtin.generate("prose", 0.06, seed=5), *builtin.generate("junk", 0.06, seed=6)]
    docs += [d.replace(".", "!", 1) for d in docs[:40]]  # near copies for dedup
    random.Random(0).shuffle(docs)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curate")
    crawl(root / "crawl.jsonl")
    sources = [
        {"name": "prose", "builtin": "prose", "builtin_mb": 0.1, "weight": 0.5},
        {
            "name": "crawl",
            "path": str(root / "crawl.jsonl"),
            "weight": 0.5,
            "curation": {
                "quality": {"positives": ["prose"], "negatives": ["junk"], "max_examples": 200},
                "dedup": {"within": True},
            },
        },
    ]
    junk = [{"name": "junk", "builtin": "junk", "builtin_mb": 0.1}]
    data = {"dir": str(root / "local"), "tokenizer": "gpt2", "num_proc": 1, "val_fraction": 0.05, "sources": sources}
    data["reference_sources"] = junk
    return write_config(root / "c.json", data, {"vocab_size": 50257})


def prepared(data_dir: Path) -> tuple[bytes, dict]:
    """The crawl's token file and manifest entry."""
    manifest = read_manifest(data_dir)
    assert manifest is not None
    entry = next(e for e in manifest["sources"] if e["name"] == "crawl")
    return (data_dir / entry["file"]).read_bytes(), entry


@pytest.fixture(scope="module")
def local(config: Path) -> tuple[bytes, dict]:
    """The reference: prepare curating everything itself."""
    assert main(["prepare", str(config)]) == 0
    return prepared(config.parent / "local")


def test_local_executor_gives_the_same_token_files(config: Path, local: tuple[bytes, dict], capsys) -> None:
    data = config.parent / "staged-local"
    argv = [str(config), f"data.dir={data}"]
    assert main(["curate", *argv, "--tasks", "3", "--workers", "1"]) == 0
    assert "in 3 task(s) on the local executor" in capsys.readouterr().out
    result = json.loads((data / "curation" / "staged" / "crawl" / "result" / "meta.json").read_text())
    rows = local[1]["curation"]
    assert result["tasks"] == 3 and result["documents"]["quality"] <= rows["quality"]["documents"]
    assert result["documents"]["dedup"] == rows["dedup"]["documents"]  # what quality kept, all distinct here
    assert rows["dedup"]["dropped_fuzzy"] + rows["dedup"]["dropped_exact"] > 0
    assert main(["prepare", *argv]) == 0
    out = capsys.readouterr().out
    assert "crawl: quality scores looked up in" in out and "crawl: dedup signatures looked up in" in out
    tokens, entry = prepared(data)
    assert tokens == local[0]
    assert entry["curation"] == local[1]["curation"]
    assert main(["curate", *argv, "--tasks", "3"]) == 0  # up to date: nothing is staged again
    assert "its staged results are up to date" in capsys.readouterr().out
    # another keep rule: the staged results are not this run's (dedup's were signed after the old rule)
    assert main(["prepare", *argv, "data.sources.1.curation.quality.alpha=5"]) == 0
    out = capsys.readouterr().out
    assert "crawl: quality filter: kept" in out and "looked up" not in out


@pytest.mark.slow
def test_slurm_executor_renders_and_runs_the_job(config: Path, local: tuple[bytes, dict], tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    data = tmp_path / "staged-slurm"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "scalegpt", "curate", str(config), f"data.dir={data}"]
    run = subprocess.run(
        [*cmd, "--executor", "slurm", "--tasks", "2", "--partition", "debug", "--time", "1:00:00"]
        + ["--cpus-per-task", "2", "--mem-per-cpu-gb", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tasks_log = (bin_dir / "tasks.log").read_text() if (bin_dir / "tasks.log").is_file() else ""
    assert run.returncode == 0, run.stderr[-3000:] + tasks_log[-3000:]
    assert "submitted; when both jobs are done, run `scalegpt prepare" in run.stdout
    scripts = sorted((data / "curation" / "staged" / "logs").glob("*/*/launch_script.slurm"))
    assert [s.parent.name for s in scripts] == ["merge", "score-and-sign"]
    score = (scripts[1]).read_text()
    assert "#SBATCH --partition=debug" in score and "#SBATCH --array=0-1" in score and "#SBATCH --time=1:00:00" in score
    assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in score
    assert "#SBATCH --cpus-per-task=2" in score and "#SBATCH --mem-per-cpu=3G" in score
    calls = (bin_dir / "sbatch.calls").read_text().splitlines()
    assert any("--dependency=afterok:" in c for c in calls)  # the merge waits for the array
    run = subprocess.run(
        [sys.executable, "-m", "scalegpt", "prepare", str(config), f"data.dir={data}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "crawl: quality scores looked up in" in run.stdout
    tokens, entry = prepared(data)
    assert tokens == local[0] and entry["curation"] == local[1]["curation"]


def test_bad_task_counts_are_one_line(config: Path, capsys) -> None:
    assert main(["curate", str(config), "--tasks", "0"]) == 2
    assert "--tasks must be at least 1" in one_error_line(capsys.readouterr().err)
