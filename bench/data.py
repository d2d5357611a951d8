"""Data pipeline figures: `scalegpt prepare`'s peak memory, scratch disk and throughput on JSONL corpora of
increasing size, against a plain `tokenizers` encode_batch loop over the same file. Prints figures;
asserts nothing.

    .venv/bin/python bench/data.py [--sizes-mb 200 600 2000] [--baseline-at 600] [--workers 2] [--work /tmp/...]

The corpora are generated (never committed) under --work from ../shared/data/corpora: paragraphs of
the five domains shuffled into documents of 1-20 paragraphs, one JSON object per line. The tokenizer is
GPT-2's 50257-token BPE (the packaged one). `prepare` runs as the real command in its own process; its process tree (the
main process and its workers) is sampled with psutil every 0.1 s for resident memory (RSS, and PSS,
which counts pages shared by forked workers once) and the data folder for its size beyond the finished
token files. The baseline is the loop a user would write: read the JSONL, 1000 documents per
encode_batch call, with `tokenizers`' own threads on every core; it runs right after prepare on the
same corpus, so both see the same machine. On the first corpus, the mixture sampler's figures follow
(`Mixture.resolve` on consecutive global indices from 10^9, `Mixture.batch` gathering 1025-token windows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
SCALEGPT = Path(sys.executable).with_name("scalegpt")


@dataclass
class Peak:
    """What one sampled command peaked at, and how long it took."""

    seconds: float
    cpu_seconds: float
    """User + system CPU of the command and every process it waited for (its workers, its threads)."""
    rss_gb: float
    pss_gb: float
    scratch_gb: float


def make_corpus(path: Path, mb: int, corpora: Path) -> None:
    """mb MB of JSONL documents of shuffled paragraphs (skipped when the file is already that size)."""
    if path.is_file() and abs(path.stat().st_size - mb * 1e6) < 1e6:
        return
    paras = [p for f in sorted(corpora.glob("*.txt")) for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng, size = random.Random(mb), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            line = json.dumps({"text": "\n\n".join(rng.choices(paras, k=rng.randint(1, 20)))}) + "\n"
            f.write(line)
            size += len(line.encode())


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sampled(cmd: list[str], watch: Path | None, final_suffix: str = ".bin") -> Peak:
    """Run cmd, sampling its process tree's memory and (when given) the watched folder's scratch bytes."""
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL)
    rss = pss = scratch = 0
    while proc.poll() is None:
        r = p = 0
        for q in tree(proc):
            try:
                info = q.memory_full_info()
                r, p = r + info.rss, p + info.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        rss, pss = max(rss, r), max(pss, p)
        if watch is not None and watch.is_dir():
            scratch = max(scratch, _scratch_bytes(watch, final_suffix))
        time.sleep(0.1)
    seconds, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return Peak(seconds, cpu, rss / 1e9, pss / 1e9, scratch / 1e9)


def _scratch_bytes(folder: Path, final_suffix: str) -> int:
    """Bytes under folder beyond the token files (scratch, temporaries, document ends, the manifest)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            if n.endswith(final_suffix):  # a token file, finished or being written
                continue
            try:
                total += os.stat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def prepare(corpus: Path, tokenizer: Path, workers: int, work: Path) -> tuple[Peak, float]:
    """`scalegpt prepare` of the corpus as one JSONL source into a fresh folder: (peak, token files GB)."""
    out = work / f"prep-{corpus.stem}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cfg = work / f"{corpus.stem}.yaml"
    model = {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 1024, "vocab_size": 50257}
    data = {
        "dir": str(out),
        "tokenizer": str(tokenizer),
        "num_proc": workers,
        "sources": [{"name": "web", "path": str(corpus)}],
    }
    cfg.write_text(json.dumps({"model": model, "data": data, "train": {"max_steps": 10, "micro_batch": 1}}))
    peak = sampled([str(SCALEGPT), "prepare", str(cfg)], out)
    token_gb = sum(p.stat().st_size for p in out.glob("*.bin")) / 1e9
    return peak, token_gb


def sampler(data_dir: Path) -> dict[str, float]:
    """Mixture-sampler figures on a prepared folder: index resolution and batch gathering."""
    import numpy as np

    from scalegpt.train.data.mixture import Mixture

    m = Mixture(data_dir, 1024, seed=1337)
    m.resolve(np.arange(1000))  # warm up
    out = {}
    for n in (100_000, 1_000_000):
        t0 = time.perf_counter()
        m.resolve(np.arange(10**9, 10**9 + n))
        out[f"resolve {n:,} consecutive (indices/s)"] = n / (time.perf_counter() - t0)
    for rows, calls in ((16, 200), (512, 20)):
        t0 = time.perf_counter()
        for step in range(calls):
            m.batch(range(step * rows, step * rows + rows))
        out[f"batch of {rows} x 1025 tokens (ms per call)"] = (time.perf_counter() - t0) / calls * 1e3
    return out


BASELINE = """
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
n, batch = 0, []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        batch.append(json.loads(line)["text"])
        if len(batch) == 1000:
            n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
            batch = []
n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
print(n)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 600, 2000])
    p.add_argument("--baseline-at", type=int, default=600, help="corpus size (MB) to time the plain loop on")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--corpora", type=Path, default=SHARED / "corpora")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "scalegpt-bench-data")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from scalegpt.train.data.tokenizer import load_tokenizer

    tokenizer = args.work / "gpt2.json"  # the packaged GPT-2 BPE, as one file both sides load
    load_tokenizer("gpt2").save(str(tokenizer))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; load {os.getloadavg()}")  # fmt: skip
    print(f"{'input':>8} {'seconds':>8} {'MB/s':>6} {'peak RSS':>9} {'peak PSS':>9} {'scratch':>8} {'tokens':>8}")
    for mb in args.sizes_mb:
        corpus = args.work / f"corpus-{mb}mb.jsonl"
        make_corpus(corpus, mb, args.corpora)
        size = corpus.stat().st_size / 1e6
        peak, token_gb = prepare(corpus, tokenizer, args.workers, args.work)
        print(
            f"{size / 1e3:6.2f}GB {peak.seconds:8.1f} {size / peak.seconds:6.2f} {peak.rss_gb:7.2f}GB "
            f"{peak.pss_gb:7.2f}GB {peak.scratch_gb:6.2f}GB {token_gb:6.2f}GB   prepare, {args.workers} workers",
            flush=True,
        )
        if mb == args.baseline_at:
            base = sampled([sys.executable, "-c", BASELINE, str(corpus), str(tokenizer)], None)
            print(
                f"{size / 1e3:6.2f}GB {base.seconds:8.1f} {size / base.seconds:6.2f} {base.rss_gb:7.2f}GB "
                f"{base.pss_gb:7.2f}GB {'':>8} {'':>8}   plain encode_batch loop, all cores"
            )
            print(
                f"ratio prepare / plain loop at {size / 1e3:.2f} GB: {base.seconds / peak.seconds:.2f}x (target 0.8x)"
            )
            print(
                f"CPU seconds, plain loop / prepare: {base.cpu_seconds:.1f} / {peak.cpu_seconds:.1f} = "
                f"{base.cpu_seconds / peak.cpu_seconds:.2f}x (wall time on a shared machine swings with its load)"
            )
        if mb == args.sizes_mb[0]:
            for name, value in sampler(args.work / f"prep-{corpus.stem}").items():
                print(f"sampler {name:<42}: {value:,.1f}")
        subprocess.run(["rm", "-rf", str(args.work / f"prep-{corpus.stem}")], check=True)


if __name__ == "__main__":
    main()
