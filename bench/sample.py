"""Sampling throughput: our generate() with and without the KV cache, beside transformers' GPT-2 generate
on the same weights. Prints figures, never pass/fail; results are kept in bench/RESULTS.md.

    .venv/bin/python bench/sample.py [--threads 1] [--models tiny gpt3-small] [--new-tokens 256]

Greedy decoding of random prompts of 16 tokens, random weights, tokens/s = batch x new tokens / seconds
(prefill included), best of --repeats runs with ours and transformers interleaved so that a busy machine
penalizes both alike. transformers' GPT-2 cannot go past n_positions, so where prompt + new tokens
exceed n_ctx (the tiny model) the side-by-side ratio is taken at n_ctx - 16 new tokens, and our
figure at the full count includes the window re-encoding of model/generate.py. On CUDA the bf16
figures are also set against the memory-bandwidth bound: every decoding step reads every weight once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from scalegpt.model import GPT, ModelConfig, build_model
from scalegpt.model.generate import generate
from scalegpt.model.hf import hf_config, to_hf_state_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"
PROMPT_LEN = 16
HBM_GBS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100": 2039,
}


def model_config(name: str) -> ModelConfig:
    """A preset from configs/model, forced dense so that it maps onto GPT-2."""
    fields = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    return ModelConfig(**{**fields, "attention": "dense"})  # type: ignore[arg-type]


def hf_twin(model: GPT) -> torch.nn.Module:
    """transformers' GPT2LMHeadModel holding exactly our weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_config(model.config)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied to wte
    hf.generation_config.eos_token_id = None  # like ours: no early stop, no token suppressed
    hf.generation_config.pad_token_id = 0
    return hf.to(next(model.parameters()).device, next(model.parameters()).dtype).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, the callables taking turns (warm up before calling this)."""
    with torch.inference_mode():
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):
            for name, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    cfg = model_config(name)
    model = build_model(cfg, device=device, seed=0).to(dtype).eval()
    hf = hf_twin(model)
    n_full = args.new_tokens
    n_hf = min(n_full, cfg.n_ctx - PROMPT_LEN)
    n_nocache = args.nocache_tokens if cfg.n_layer > 2 else n_full
    repeats = args.repeats if cfg.n_layer <= 2 else args.big_repeats
    rows = []
    for batch in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(device)

        def ours(n: int, cache: bool, p: torch.Tensor = prompt) -> Callable[[], object]:
            return lambda: generate(model, p, max_new_tokens=n, temperature=0, use_cache=cache)

        def theirs(n: int, p: torch.Tensor = prompt) -> Callable[[], object]:
            mask = torch.ones_like(p)
            return lambda: hf.generate(p, attention_mask=mask, do_sample=False, max_new_tokens=n)

        with torch.inference_mode():  # first calls pay for allocation and lazy initialization
            ours(4, True)(), ours(4, False)(), theirs(4)()
        runs = {"ours_cache_hf_n": ours(n_hf, True), "hf": theirs(n_hf)}
        if n_full != n_hf:
            runs["ours_cache"] = ours(n_full, True)
        secs = best_seconds(runs, repeats)
        secs.update(best_seconds({"ours_nocache": ours(n_nocache, False)}, 1 if cfg.n_layer > 2 else repeats))
        secs.setdefault("ours_cache", secs["ours_cache_hf_n"])
        tps = {
            "ours_cache": batch * n_full / secs["ours_cache"],
            "ours_nocache": batch * n_nocache / secs["ours_nocache"],
            "ours_cache_hf_n": batch * n_hf / secs["ours_cache_hf_n"],
            "hf": batch * n_hf / secs["hf"],
        }
        row = dict(model=name, batch=batch, n_full=n_full, n_nocache=n_nocache, n_hf=n_hf, **tps)
        row["ratio"] = tps["ours_cache_hf_n"] / tps["hf"]
        row["params"] = model.num_params(non_embedding=True)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (
        f"| {r['model']} | {r['batch']} | {r['ours_cache']:.0f} ({r['n_full']}) | {r['ours_nocache']:.0f} "
        f"({r['n_nocache']}) | {r['ours_cache_hf_n']:.0f} ({r['n_hf']}) | {r['hf']:.0f} ({r['n_hf']}) | "
        f"{r['ratio']:.2f}x |"
    )


HEADER = (
    "| model | batch | ours, cache: tok/s (new tokens) | ours, no cache | ours, cache, side by side "
    "| transformers generate | ours / transformers |\n|---|---|---|---|---|---|---|"
)


def bandwidth_report(rows: list[dict], dtype: torch.dtype, hbm_gbs: float | None) -> None:
    """Decoding reads every weight once per step, so tokens/s <= batch x bandwidth / bytes of weights."""
    name = torch.cuda.get_device_name()
    bw = hbm_gbs or next((v for k, v in HBM_GBS.items() if k in name), None)
    if bw is None:
        print(f"\n{name}: HBM bandwidth unknown; pass --hbm-gbs to get the bandwidth bound")
        return
    per_param = torch.finfo(dtype).bits // 8
    print(f"\nbandwidth bound on {name} ({bw} GB/s, {dtype}):")
    print(f"  tokens/s <= batch x {bw}e9 B/s / (params x {per_param} B)   (KV-cache reads ignored)")
    for r in rows:
        bound = r["batch"] * bw * 1e9 / (r["params"] * per_param)
        print(
            f"  {r['model']} batch {r['batch']}: {r['params'] / 1e6:.1f}M params, bound {bound:,.0f} tok/s; "
            f"ours {r['ours_cache']:,.0f} tok/s = {100 * r['ours_cache'] / bound:.1f}%"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "gpt3-small"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--nocache-tokens", type=int, default=16, help="new tokens without the cache, big models")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs, tiny model")
    p.add_argument("--big-repeats", type=int, default=1, help="best of this many runs, gpt3-small")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--hbm-gbs", type=float, default=None, help="GPU memory bandwidth in GB/s")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers

    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"{datetime.date.today()}  {where}  {os.cpu_count()} CPUs  torch {torch.__version__}  "
        f"transformers {transformers.__version__}  threads {torch.get_num_threads()}  {dtype}  "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(HEADER, flush=True)
    start = time.perf_counter()
    rows = [r for name in args.models for r in bench_model(name, args, device, dtype)]
    print(f"\n{time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f} at the end")
    if device.type == "cuda":
        bandwidth_report(rows, dtype, args.hbm_gbs)


if __name__ == "__main__":
    main()
