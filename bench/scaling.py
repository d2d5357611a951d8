"""Scaling arithmetic, not a measurement: tokens/s and days to 300B tokens for GPT-3 presets on N GPUs
under ZeRO-2, from one GPU's throughput and the bytes each step moves between GPUs.

Compute. One GPU's tokens/s comes from `--tokens-per-sec` (a measurement, e.g. bench/gpu_check.sh) or,
failing that, from an assumed MFU: tokens/s = MFU x peak / FLOPs per token (PaLM's formula, as in
model/flops.py). Data parallelism keeps each GPU's share of the global batch, so its compute time per
step is its tokens over that rate. Where the paper's batch gives a GPU less than one sequence, the
global batch grows to one sequence per GPU, and the table says so.

Communication. ZeRO-2 reduce-scatters the gradients and all-gathers the updated parameters: 2Ψ(N-1)/N
elements sent by each GPU per step, the volume of one ring all-reduce, i.e. of plain data parallelism
(Rajbhandari et al. 2020, Section 7). Its time is those bytes over the collective's bus bandwidth per GPU,
NVLink inside a node, the network across nodes. With overlap_comm the reduction runs during the backward
pass, so a step takes between max(compute, comm) (full overlap) and compute + comm (none).

    python bench/scaling.py                        # gpt3-small and gpt3-xl on 8, 64, 512 H100s
    python bench/scaling.py --tokens-per-sec 4.1e5  # from a measured single-GPU rate instead
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scalegpt.model.flops import count_params, flops_per_token
from scalegpt.train.config.loading import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["gpt3-small", "gpt3-xl"])
    p.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 512])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.40, help="assumed single-GPU MFU (llm.c's public H100 mark)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, dense bf16 (H100 SXM)")
    p.add_argument("--tokens-per-sec", type=float, default=None, help="measured single-GPU rate; overrides --mfu")
    p.add_argument("--nvlink-gbs", type=float, default=360.0, help="all-reduce bus bandwidth per GPU in a node")
    p.add_argument("--network-gbs", type=float, default=40.0, help="the same across nodes (400 Gb/s NIC per GPU)")
    p.add_argument("--grad-bytes", type=int, default=2, help="bytes per communicated element (bf16: 2)")
    p.add_argument("--total-tokens", type=float, default=300e9)
    args = p.parse_args()

    print("# arithmetic, not a measurement")
    print(
        f"# assumed: {args.tokens_per_sec or f'MFU {args.mfu:.0%} of {args.peak_tflops:g} TFLOPS'} per GPU; "
        f"bus bandwidth {args.nvlink_gbs:g} GB/s per GPU within a node of {args.gpus_per_node}, "
        f"{args.network_gbs:g} GB/s across nodes; {args.grad_bytes}-byte gradients and parameters on the wire"
    )
    header = (
        "| config | GPUs | global batch (seqs) | per-GPU tokens/step | compute ms | comm ms | comm/compute "
        "| tokens/s (full overlap .. none) | days to 300B (full overlap .. none) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.configs:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        model = cfg.model
        psi = count_params(model)
        per_token = flops_per_token(model)
        one_gpu = args.tokens_per_sec or args.mfu * args.peak_tflops * 1e12 / per_token
        for n in args.gpus:
            seqs = max(cfg.train.global_batch, n)
            grown = f" (paper: {cfg.train.global_batch})" if seqs > cfg.train.global_batch else ""
            per_gpu_tokens = seqs / n * model.n_ctx
            compute = per_gpu_tokens / one_gpu
            bandwidth = (args.nvlink_gbs if n <= args.gpus_per_node else args.network_gbs) * 1e9
            comm = 2 * psi * (n - 1) / n * args.grad_bytes / bandwidth
            fast, slow = (n * per_gpu_tokens / t for t in (max(compute, comm), compute + comm))
            days = [args.total_tokens / rate / 86400 for rate in (fast, slow)]
            print(
                f"| {name} ({psi / 1e6:,.0f}M) | {n} | {seqs}{grown} | {per_gpu_tokens:,.0f} | {compute * 1e3:,.1f} | "
                f"{comm * 1e3:,.1f} | {comm / compute:.2f} | {fast / 1e6:.2f}M .. {slow / 1e6:.2f}M | "
                f"{days[0]:.2f} .. {days[1]:.2f} |"
            )
        print(f"<!-- {name}: {per_token:.3e} FLOPs/token, one GPU {one_gpu:,.0f} tokens/s -->")


if __name__ == "__main__":
    main()
