"""Peak CPU memory from torch's profiler, for the tests that check launch/memory.py's memory formulas.

Imports only torch, so test_plan.py's probe script, which runs in its own interpreter under
DeepSpeed's launcher, can import it too."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.profiler import profile


def peak_cpu_bytes(prof: profile) -> int:
    """The most bytes held at once by CPU tensors allocated while `prof` recorded, replayed from its
    allocation events in time order. A free of memory allocated before profiling started is ignored."""
    events: list[tuple[int, int, int]] = []  # (time, address, bytes: negative for a free)

    def walk(nodes: Iterable[Any]) -> None:
        for node in nodes:
            extra = node.extra_fields
            if type(extra).__name__ == "_ExtraFields_Allocation" and str(extra.device) == "cpu":
                events.append((node.start_time_ns, extra.ptr, extra.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live: dict[int, int] = {}
    held = peak = 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            held += size
            peak = max(peak, held)
        elif ptr in live:
            held -= live.pop(ptr)
    return peak
