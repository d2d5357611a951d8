"""`scalegpt curate CONFIG [key=value ...] [--executor local|slurm] [--tasks N]`: the costly, per-document half
of curation (the quality filter's scores, dedup's MinHash signatures) run on an executor of datatrove, Hugging
Face's pipeline engine, so a web-scale source is curated by a cluster rather than by prepare's one process.

Two stages, as datatrove pipelines: N tasks each read every curated source and take the documents whose
number is their rank modulo N, score and sign them, and write a shard (train/data/prepare/staged.py); then
one task merges each source's shards into its staged result. The classifier is trained (or loaded) here,
before the job, on its bounded sample, as prepare would, and saved where prepare looks for it. `scalegpt
prepare` afterwards finds the staged results, keyed by the source's inputs and the step's settings, and
looks each document up instead of computing it; the decisions stay in prepare, so the token files are
those a local prepare makes (tests/test_curate.py checks it).

With `--executor slurm`, datatrove writes an sbatch array script per stage into the job's logging folder
under data.dir/curation/staged/logs/ and submits both, the merge after the array; curate returns once they
are submitted, and prepare is run when they are done. A task that finished is not run again when curate
is re-run (datatrove's completion markers), so a killed job resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..train.config.loading import load_config
from ..train.config.schema import Config, to_yaml
from ..train.data import sources as src_mod
from ..train.data.prepare import dedup, quality, staged
from ..train.data.prepare.plan import file_name, plan_prepare
from ..train.errors import UserError, check_writable_dir


@dataclass(frozen=True)
class Job:
    """What the tasks need, in a form datatrove can pickle: file paths and plain values only."""

    config: str
    """The resolved config, as YAML, saved in the job's folder."""
    sources: tuple[int, ...]
    """Indices of the curated sources in data.sources."""
    data_dir: str


@dataclass(frozen=True)
class ScoreAndSign:
    """Stage 1, one task of N: its share of every curated source's documents, scored and signed."""

    job: Job

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        cfg = load_config(self.job.config, [])
        plan, _ = plan_prepare(cfg, echo=lambda *_: None)
        for i in self.job.sources:
            src = plan.sources[i]
            q, d = plan.quality_filter(i), plan.dedup_job(i)
            frags = src_mod.fragments(src, invalid_utf8=cfg.data.invalid_utf8, chunk=None, stats=src_mod.ReadStats())
            mine = ((doc, True) for n, doc in enumerate(src_mod.whole_documents(frags)) if n % world_size == rank)
            parts: dict[str, list[np.ndarray]] = {}
            for batch in src_mod.document_batches(mine):
                if q is not None:  # scored as prepare scores; dedup then sees only what the keep rule keeps
                    scores = q.clf.scores(batch)
                    _add(parts, "quality", {"hashes": staged.doc_hashes(batch), "scores": scores})
                    kept, _ = q.rule.decide(scores, batch)
                    batch = [doc for doc, k in zip(batch, kept.tolist(), strict=True) if k]
                if d is not None and batch:
                    s = dedup.signatures(batch, d.cfg)
                    arrays = {name: getattr(s, name) for name in dedup.STAGED}
                    _add(parts, "dedup", {"hashes": staged.doc_hashes(batch), **arrays})
            out = {name: np.concatenate(p) for name, p in parts.items()}
            for step, on, width in (("quality", q, 0), ("dedup", d, 0)):
                if on is not None and f"{step}-hashes" not in out:  # a task with no documents of its own
                    out[f"{step}-hashes"] = np.zeros(width, dtype=np.uint64)
            staged.write_shard(staged.folder(Path(self.job.data_dir), file_name(src.name)), rank, out)
        return iter(())


def _add(parts: dict[str, list[np.ndarray]], step: str, arrays: dict[str, np.ndarray]) -> None:
    for name, a in arrays.items():
        parts.setdefault(f"{step}-{name}", []).append(a)


@dataclass(frozen=True)
class Merge:
    """Stage 2, one task: each curated source's shards merged into its staged result."""

    job: Job
    tasks: int

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        cfg = load_config(self.job.config, [])
        plan, _ = plan_prepare(cfg, echo=lambda *_: None)
        for i in self.job.sources:
            where = staged.folder(Path(self.job.data_dir), file_name(plan.sources[i].name))
            staged.merge(where, self.tasks, plan.staged_key(i))
        return iter(())


@dataclass(frozen=True)
class Cluster:
    """The SLURM settings of `--executor slurm`."""

    partition: str | None
    time: str
    cpus_per_task: int
    mem_per_cpu_gb: int
    """Whole GB: SLURM takes --mem-per-cpu=3G, not 3.0G."""


def executors(job: Job, folder: Path, tasks: int, workers: int, kind: str, cluster: Cluster) -> Any:
    """The merge stage's executor, which runs (or submits) the scoring stage first."""
    # imported here: datatrove (and its logging) loads only for this command
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        first = LocalPipelineExecutor(
            pipeline=[ScoreAndSign(job)], tasks=tasks, workers=workers, logging_dir=str(folder / "score-and-sign")
        )
        return LocalPipelineExecutor(
            pipeline=[Merge(job, tasks)], tasks=1, workers=1, logging_dir=str(folder / "merge"), depends=first
        )
    from datatrove.executor import SlurmPipelineExecutor

    common: dict[str, Any] = {
        "time": cluster.time,
        "partition": cluster.partition,
        "cpus_per_task": cluster.cpus_per_task,
        "mem_per_cpu_gb": cluster.mem_per_cpu_gb,
        "venv_path": str(Path(sys.prefix) / "bin" / "activate"),
        "with_srun": False,
    }
    first = SlurmPipelineExecutor(
        pipeline=[ScoreAndSign(job)],
        tasks=tasks,
        workers=workers,
        job_name="scalegpt-curate-score",
        logging_dir=str(folder / "score-and-sign"),
        **common,
    )
    return SlurmPipelineExecutor(
        pipeline=[Merge(job, tasks)],
        tasks=1,
        job_name="scalegpt-curate-merge",
        logging_dir=str(folder / "merge"),
        depends=first,
        **common,
    )


def curate(cfg: Config, *, kind: str, tasks: int, workers: int, cluster: Cluster, echo: Any = print) -> Path | None:
    """Stage the curated sources' per-document work; return the job's folder, or None when all is up to date."""
    plan, _ = plan_prepare(cfg, echo)
    data_dir = Path(cfg.data.dir)
    todo = []
    for i, src in enumerate(plan.sources):
        key = plan.staged_key(i)
        if key.quality is None and key.dedup is None:
            continue
        where = staged.folder(data_dir, file_name(src.name))
        steps = [step for step, on in (("quality", key.quality), ("dedup", key.dedup)) if on is not None]
        if all(staged.Staged.load(where, key, step) is not None for step in steps):
            echo(f"  {src.name}: its staged results are up to date")
            continue
        todo.append(i)
    if not todo:
        echo("nothing to stage: no source has a quality or dedup step, or their staged results are up to date")
        return None
    for i in todo:  # the tasks load the classifier from where prepare reuses it
        clf = plan.classifiers.get(i)
        if clf is not None and clf.loaded_from is None:
            clf.save(quality.stem(data_dir, file_name(plan.sources[i].name)))
            clf.loaded_from = quality.json_path(quality.stem(data_dir, file_name(plan.sources[i].name)))
    text = to_yaml(cfg)
    job_id = hashlib.sha256(json.dumps([text, todo, tasks]).encode()).hexdigest()[:12]
    folder = staged.folder(data_dir, "logs") / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(text)
    job = Job(str(folder / "config.yaml"), tuple(todo), str(data_dir.resolve()))
    names = ", ".join(plan.sources[i].name for i in todo)
    echo(f"staging the scores and signatures of {names} in {tasks} task(s) on the {kind} executor ({folder})")
    executors(job, folder, tasks, workers, kind, cluster).run()
    return folder


def curate_command(args: argparse.Namespace) -> int:
    """The CLI entry point (launch/cli.py)."""
    if args.tasks < 1 or args.workers == 0 or args.workers < -1:
        raise UserError(
            f"--tasks must be at least 1 and --workers at least 1 (or -1: all), got {args.tasks}, {args.workers}"
        )
    cfg = load_config(args.config, args.overrides)
    check_writable_dir(cfg.data.dir, "data.dir")
    cluster = Cluster(args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb)
    folder = curate(cfg, kind=args.executor, tasks=args.tasks, workers=args.workers, cluster=cluster)
    if folder is not None and args.executor == "slurm":
        print(f"submitted; when both jobs are done, run `scalegpt prepare {args.config}` (scripts in {folder})")
    elif folder is not None:
        print(f"done; `scalegpt prepare {args.config}` now uses these results")
    return 0
