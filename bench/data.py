"""Data pipeline figures: `scalegpt prepare` tokenization throughput against a plain `tokenizers` loop over
the same text, and mixture-sampler index resolution. Prints figures; asserts nothing.

    .venv/bin/python bench/data.py [--corpora ../shared/data/corpora] [--workers 2] [--repeats 2] [--copies 1]

Both tokenizers are GPT-2's 50257-token BPE (../shared/data/gpt2_tokenizer). The baseline is the best of
two natural loops calling encode_batch (rayon threads on every core): the corpora's lines, 1000 per call,
and 64 KB pieces, 8 per call. `prepare` is timed end to end (read, tokenize with `datasets` map on
--workers processes, summarize, write token files and manifest), imports excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tokenizers import Tokenizer

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (the map's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, float, T]:
    """(wall seconds, CPU seconds, result): wall time is what the target is about; CPU time is what a
    busy shared machine cannot distort."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, cpu_seconds() - c0, result


def baseline(tok: Tokenizer, texts: list[str]) -> tuple[float, float, int]:
    """Best of two plain encode_batch loops: (wall seconds, CPU seconds, tokens) of the faster one."""
    from scalegpt.train.data.tokenizer import split_safe

    lines = [line for t in texts for line in t.splitlines(keepends=True)]
    pieces = [p for t in texts for p in split_safe(t, 1 << 16)]

    def loop(items: list[str], per_call: int) -> int:
        return sum(
            len(e.ids) for a in range(0, len(items), per_call) for e in tok.encode_batch(items[a : a + per_call])
        )

    return min((timed(loop, items, k) for items, k in ((lines, 1000), (pieces, 8))), key=lambda r: r[0])


def run_prepare(
    files: list[Path], tokenizer: Path, workers: int, out: Path, copies: int
) -> tuple[float, int, list[str]]:
    """`scalegpt prepare` on one source per file into a fresh folder: (seconds, tokens, its output)."""
    from scalegpt.train.config import load_config
    from scalegpt.train.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg_path = out / "bench.yaml"
    data = {
        "dir": str(out / "prep"),
        "tokenizer": str(tokenizer),
        "num_proc": workers,
        "val_fraction": 0.01,
        "sources": [{"name": f"{f.stem}-{k}", "path": str(f)} for k in range(copies) for f in files],
    }
    model = {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 1024, "vocab_size": 50257}
    cfg_path.write_text(json.dumps({"model": model, "data": data, "train": {"max_steps": 1000, "micro_batch": 8}}))
    cfg = load_config(cfg_path)
    lines: list[str] = []
    t0 = time.perf_counter()
    manifest = prepare(cfg, echo=lines.append)
    return time.perf_counter() - t0, sum(s["tokens"] - s["documents"] for s in manifest["sources"]), lines


def sampler(data_dir: Path) -> dict[str, float]:
    from scalegpt.train.data.mixture import Mixture

    m = Mixture(data_dir, 1024, seed=1337)
    m.resolve(np.arange(1000))  # warm up
    out = {}
    for n in (100_000, 1_000_000):
        t0 = time.perf_counter()
        m.resolve(np.arange(10**9, 10**9 + n))
        out[f"resolve {n:,} consecutive (indices/s)"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(200):
        m.batch(range(step * 16, step * 16 + 16))
    out["batch of 16 x 1025 tokens (ms per call)"] = (time.perf_counter() - t0) / 200 * 1e3
    t0 = time.perf_counter()
    for step in range(20):
        m.batch(range(step * 512, step * 512 + 512))
    out["batch of 512 x 1025 tokens (ms per call)"] = (time.perf_counter() - t0) / 20 * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpora", type=Path, default=SHARED / "corpora")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "gpt2_tokenizer")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs of each side")
    p.add_argument("--copies", type=int, default=1, help="each corpus this many times (amortizes fixed costs)")
    args = p.parse_args()
    files = sorted(args.corpora.glob("*.txt"))
    if not files or not args.tokenizer.is_dir():
        raise SystemExit(f"needs {args.corpora}/*.txt and {args.tokenizer}; see ../shared/data/README.md")

    import datasets  # noqa: F401  (imports are not part of the timing)

    from scalegpt.train.config import load_config  # noqa: F401
    from scalegpt.train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    texts = [f.read_text(encoding="utf-8") for f in files] * args.copies
    mb = sum(len(t.encode()) for t in texts) / 1e6
    work = Path(tempfile.mkdtemp(prefix="scalegpt-bench-"))
    try:
        t_base = t_prep = c_base = c_prep = t_one = float("inf")
        for _ in range(args.repeats):  # interleaved, so all sides see the same machine load
            t, cpu, n_base = baseline(tok, texts)
            t_base, c_base = min(t_base, t), min(c_base, cpu)
            _, cpu, (t, n_prep, lines) = timed(run_prepare, files, args.tokenizer, args.workers, work, args.copies)
            t_prep, c_prep = min(t_prep, t), min(c_prep, cpu)
            if args.workers != 1:  # context: the same pipeline without a worker pool
                t_one = min(t_one, run_prepare(files, args.tokenizer, 1, work, args.copies)[0])
        figures = sampler(work / "prep")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    print(f"corpora: {len(files)} files x {args.copies}, {mb:.2f} MB, {n_prep:,} GPT-2 tokens (baseline {n_base:,})")
    print(f"plain tokenizers encode_batch loop : {mb / t_base:6.2f} MB/s ({t_base:.2f} s)")
    print(f"scalegpt prepare, {args.workers} workers       : {mb / t_prep:6.2f} MB/s ({t_prep:.2f} s, end to end)")
    if t_one < float("inf"):
        print(f"scalegpt prepare, 1 worker        : {mb / t_one:6.2f} MB/s ({t_one:.2f} s, end to end)")
    print(f"ratio prepare / baseline           : {t_base / t_prep:6.2f}x (target >= 0.8x)")
    print(f"CPU seconds, baseline / prepare    : {c_base:.2f} / {c_prep:.2f} = {c_base / c_prep:.2f}x")
    for line in lines:
        if "tokenized" in line:
            print(f"prepare's own report               :{line}")
    for name, value in figures.items():
        print(f"sampler {name:<42}: {value:,.1f}")


if __name__ == "__main__":
    main()
