"""Peak memory of one fp32 training step (forward + backward), and the loss's share of it.

Each variant runs in a fresh interpreter, and its peak is the kernel's resident-set high-water mark
(``ru_maxrss``): torch allocates outside Python's heap, so tracemalloc would see none of it. The
children run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so glibc hands every tensor larger
than that back to the kernel when it is freed, and the high-water mark follows the live tensors
instead of the allocator's cache.

- ``loss``: ``model(x, targets)`` and backward, the training step;
- ``sum``: the same network with the head and loss replaced by ``hidden.sum()``.

The loss's share is loss - sum. Both variants build the same model from the same seed, so
everything else (imports, weights, gradients, the blocks' activations) cancels out.

    python bench/loss_memory.py                       # gpt3-small width, n_ctx 2048, micro batch 1
    python bench/loss_memory.py --n-layer 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("loss", "sum")


def child(variant: str, n_layer: int, n_ctx: int, micro_batch: int) -> dict[str, float]:
    """One training step of `variant` in this process; returns its figures."""
    import torch

    from scalegpt.model import GPT, ModelConfig

    torch.set_num_threads(int(os.environ.get("LOSS_MEMORY_THREADS", "2")))
    config = ModelConfig(n_layer=n_layer, n_head=12, d_model=768, n_ctx=n_ctx, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT(config)
    data = torch.randint(0, config.vocab_size, (micro_batch, n_ctx + 1))
    x, y = data[:, :-1], data[:, 1:]
    start = time.perf_counter()
    if variant == "loss":
        loss = model(x, y)[1]
    else:
        t = model.transformer
        h = t.drop(t.wte(x) + t.wpe(torch.arange(n_ctx)))
        for block in t.h:
            h = block(h)
        loss = t.ln_f(h).sum()  # no head: the network without the output layer and cross-entropy
    loss.backward()
    return {
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,  # KiB on Linux
        "loss": float(loss),
        "seconds": time.perf_counter() - start,
    }


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    argv = [sys.executable, __file__, "--child", variant]
    argv += ["--n-layer", str(args.n_layer), "--n-ctx", str(args.n_ctx), "--micro-batch", str(args.micro_batch)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n_layer, args.n_ctx, args.micro_batch)))
        return
    figures = {v: measure(v, args) for v in VARIANTS}
    share = figures["loss"]["peak_bytes"] - figures["sum"]["peak_bytes"]
    mib = 2.0**20
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}; d_model 768, 12 heads, vocab 50257, n_layer {args.n_layer}, "
        f"n_ctx {args.n_ctx}, micro batch {args.micro_batch}, fp32"
    )
    for v in VARIANTS:
        f = figures[v]
        print(f"{v:>5}: peak RSS {f['peak_bytes'] / mib:,.0f} MiB, loss {f['loss']:.6f}, step {f['seconds']:.1f} s")
    print(f"loss's share of the peak: {share / mib:,.0f} MiB")
    if args.json:
        from scalegpt.train.osutil import write_json_atomic

        write_json_atomic(args.json, {"variants": figures, "loss_share_bytes": share, "args": vars(args)})


if __name__ == "__main__":
    main()
