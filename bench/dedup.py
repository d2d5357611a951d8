"""Deduplication figures (issue 23, Deliver 6): documents per second, planted copies removed, distinct documents
lost and peak memory, for curation.dedup's step and for the libraries it was chosen among. Prints figures;
asserts nothing.

    .venv/bin/python bench/dedup.py [--mb 20] [--ours-mb 1000] [--mem-mb 200 1000] [--work /tmp/dedup-bench]

with a venv that has the candidates (datatrove, datasketch; rensa is a dependency): here, the checkout's .venv with
/work/libvenv's site-packages added by a .pth file, so that `scalegpt` is this checkout's code.

The corpora are generated under --work (never committed) by train/data/planted.py, the generator the tests use:
distinct documents of real sentences from ../shared/data/corpora, 30% of them followed later by 1-3 copies that
differ by a boilerplate line, two swapped sentences and 3% of their words. One JSON object per line, with an id.

Every candidate uses the same settings as curation.dedup's defaults (3-word shingles, 128 hashes in 32 bands,
Jaccard threshold 0.5) and runs in a process of its own, which reads the JSONL itself and writes the ids (or
hashes) of the documents it keeps; its wall time and peak resident memory (ru_maxrss, children included) are
measured there, and the scoring happens here:
- ours: train/data/prepare/dedup.py's Deduplicator, as `scalegpt prepare` runs it (rensa's batch MinHash kernel,
  band keys on disk, verified candidates, clusters keep their lowest-hash document);
- rensa: RMinHash per document over shingle strings, RMinHashLSH, a candidate kept out when its estimated Jaccard
  with an earlier kept document passes the threshold;
- datasketch: MinHash.update_batch per document and MinHashLSH, the same greedy rule;
- datatrove: its four-stage MinHash pipeline (signatures, buckets, clusters, filter) on one local task.
removed = 1 - (documents kept beyond one per cluster) / planted copies; lost = clusters with no document kept.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / ".." / "shared" / "data" / "corpora"
SHINGLE, HASHES, BANDS, THRESHOLD = 3, 128, 32, 0.5


def make_corpus(mb: float, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The planted corpus of about mb megabytes (cached under work), and its labels (cluster, copy) per line."""
    from scalegpt.train.data.planted import Planted, sentences

    path, labels = work / f"planted-{mb:g}mb.jsonl", work / f"planted-{mb:g}mb.labels.npy"
    if path.is_file() and labels.is_file():
        return path, labels
    gen = Planted(sentences(CORPORA), seed)
    rows, size = [], 0
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        for i, d in enumerate(gen.docs(10**9)):
            line = json.dumps({"id": str(i), "text": d.text}) + "\n"
            f.write(line)
            rows.append((d.cluster, d.copy))
            size += len(line)
            if size >= mb * 1e6:
                break
    np.save(labels, np.array(rows, dtype=np.int64))
    os.replace(path.with_suffix(".tmp"), path)
    return path, labels


def texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def shingles(text: str) -> list[str]:
    w = " ".join(text.split()).lower().split()
    return [" ".join(w[i : i + SHINGLE]) for i in range(max(1, len(w) - SHINGLE + 1))]


def run_ours(corpus: Path, out: Path) -> None:
    from scalegpt.train.data.curation import DedupConfig
    from scalegpt.train.data.prepare.dedup import DedupJob, Deduplicator

    cfg = DedupConfig(within=True, shingle=SHINGLE, num_hashes=HASHES, bands=BANDS, threshold=THRESHOLD)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        step = Deduplicator(DedupJob(cfg, Path(tmp) / "index", "bench"), "bench", Path(tmp) / "work", Path(tmp))
        with open(out, "wb") as f:  # the kept documents' hashes, written as they come: nothing kept in memory
            for text, _ in step.apply((t, True) for t in texts(corpus)):
                f.write(hashlib.blake2b(text.encode(), digest_size=8).digest())


def _greedy(corpus: Path, out: Path, sketch, lsh) -> None:
    """Arrival order: a document is dropped when an earlier kept one passes the threshold (the libraries' way)."""
    kept = {}
    with open(out, "wb") as f:
        for i, text in enumerate(texts(corpus)):
            m = sketch(shingles(text))
            if any(kept[j].jaccard(m) >= THRESHOLD for j in lsh.query(m)):
                continue
            lsh.insert(i, m)
            kept[i] = m
            f.write(hashlib.blake2b(text.encode(), digest_size=8).digest())


def run_rensa(corpus: Path, out: Path) -> None:
    import rensa

    def sketch(sh: list[str]):
        m = rensa.RMinHash(HASHES, 1234)
        m.update(sh)
        return m

    _greedy(corpus, out, sketch, rensa.RMinHashLSH(THRESHOLD, HASHES, BANDS))


def run_datasketch(corpus: Path, out: Path) -> None:
    from datasketch import MinHash, MinHashLSH

    def sketch(sh: list[str]):
        m = MinHash(num_perm=HASHES, seed=1)
        m.update_batch([s.encode() for s in sh])
        return m

    _greedy(corpus, out, sketch, MinHashLSH(threshold=THRESHOLD, num_perm=HASHES, params=(BANDS, HASHES // BANDS)))


def run_datatrove(corpus: Path, out: Path) -> None:
    from datatrove.data import Document
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):  # its English tokenizer needs spaCy, which is not here: words as everyone else's
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    def read(data, rank: int = 0, world_size: int = 1):  # its JsonlReader needs orjson, which is not here
        for i, text in enumerate(texts(corpus)):
            yield Document(text=text, id=str(i))

    def write(data, rank: int = 0, world_size: int = 1):
        with open(out, "wb") as f:
            for doc in data:
                f.write(hashlib.blake2b(doc.text.encode(), digest_size=8).digest())
        yield from ()

    from datatrove.utils.hashing import HashConfig

    # its default xxhash passes str to an xxhash that takes bytes only (TypeError); sha1 is its other choice
    hashing = HashConfig(precision=64, hash_fc="sha1")
    cfg = MinhashConfig(n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=HASHES // BANDS, hash_config=hashing)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stages = [
            [read, MinhashDedupSignature(f"{tmp}/sigs", config=cfg, language=Words())],
            [MinhashDedupBuckets(f"{tmp}/sigs", f"{tmp}/buckets", config=cfg)],
            [MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/remove", config=cfg)],
            [read, MinhashDedupFilter(f"{tmp}/remove"), write],
        ]
        tasks = [1, BANDS, 1, 1]
        for i, (stage, n) in enumerate(zip(stages, tasks, strict=True)):
            LocalPipelineExecutor(stage, tasks=n, workers=1, logging_dir=f"{tmp}/logs{i}").run()


RUNNERS = {"ours": run_ours, "rensa": run_rensa, "datasketch": run_datasketch, "datatrove": run_datatrove}
IMPORTS = {
    "ours": ["scalegpt.train.data.prepare.dedup", "rensa"],
    "rensa": ["rensa"],
    "datasketch": ["datasketch"],
    "datatrove": ["datatrove.executor.local", "datatrove.pipeline.dedup.minhash"],
}
"""Imported before the clock starts: start-up is not the figure."""


def child(name: str, corpus: Path, out: Path) -> None:
    for module in IMPORTS[name]:
        importlib.import_module(module)
    t0 = time.perf_counter()
    RUNNERS[name](corpus, out)
    wall = time.perf_counter() - t0
    peak = max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"wall": wall, "peak_mb": peak / 1024}))


def measure(name: str, corpus: Path, labels: Path, work: Path) -> dict:
    out = work / f"kept-{name}-{corpus.stem}.bin"
    res = subprocess.run(
        [sys.executable, __file__, "--child", name, str(corpus), str(out)], capture_output=True, text=True, check=False
    )
    if res.returncode:
        return {"name": name, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    fig = json.loads(res.stdout.strip().splitlines()[-1])
    kept = set(np.fromfile(out, dtype="<u8").tolist())
    lab = np.load(labels)
    hashes = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts(corpus)]
    is_kept = np.array([h in kept for h in hashes])
    per = np.bincount(lab[:, 0], weights=is_kept, minlength=int(lab[:, 0].max()) + 1)
    clusters = np.unique(lab[:, 0])
    copies = int(lab[:, 1].sum())
    surplus = float(np.maximum(per[clusters] - 1, 0).sum())
    return {
        "name": name,
        "docs": len(hashes),
        "mb": corpus.stat().st_size / 1e6,
        "docs_per_s": len(hashes) / fig["wall"],
        "wall": fig["wall"],
        "removed": 1 - surplus / copies,
        "lost": float((per[clusters] == 0).mean()),
        "peak_mb": fig["peak_mb"],
    }


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | failed: {r['error'][:100]} | | | | | |"
    return (
        f"| {r['name']} | {r['mb']:.0f} MB, {r['docs']:,} docs | {r['docs_per_s']:,.0f} | {r['wall']:.1f} s | "
        f"{100 * r['removed']:.2f}% | {100 * r['lost']:.2f}% | {r['peak_mb']:.0f} MB |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20, help="corpus for the comparison of every candidate")
    ap.add_argument("--ours-mb", type=float, default=1000, help="corpus for ours and the fastest library")
    ap.add_argument("--mem-mb", type=float, nargs="*", default=[200, 1000], help="corpora for ours' peak memory")
    ap.add_argument("--candidates", nargs="*", default=list(RUNNERS))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dedup-bench")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], Path(a.child[1]), Path(a.child[2]))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()}, python {platform.python_version()}")
    print("| candidate | corpus | docs/s | wall | copies removed | distinct lost | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    small = make_corpus(a.mb, a.work)
    results = [measure(n, *small, a.work) for n in a.candidates]
    for r in results:
        print(row(r), flush=True)
    ok = [r for r in results if "error" not in r]
    fastest = max((r for r in ok if r["name"] != "ours"), key=lambda r: r["docs_per_s"], default=None)
    if a.ours_mb:
        big = make_corpus(a.ours_mb, a.work)
        for name in ["ours"] + ([fastest["name"]] if fastest else []):
            print(row(measure(name, *big, a.work)), flush=True)
    for mb in a.mem_mb:
        print(row(measure("ours", *make_corpus(mb, a.work), a.work)), flush=True)
    print(f"# load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
