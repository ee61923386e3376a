"""Memory read bandwidth over a buffer the size of the model's weights (the decode bound).

Batch-1 decode reads every weight once per token, so tok/s <= bandwidth / weight bytes. The
buffer must be as large as the weights: a large shared L3 makes small buffers read faster.
A float32 sum is a streaming read with almost no compute; the best of the repetitions is the
bound (the median is reported next to it). The read is measured on 4 KiB pages and on 2 MiB
(transparent huge) pages, where the system has them: on the benchmark VM huge pages read ~40%
faster, and zili keeps its weights on them (zili/huge_pages.py), so the bound is the faster of the two.

    python benchmarks/bandwidth.py --bytes 774000000 --threads 2 --reps 5
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from zili import huge_pages
from zili.huge_pages import huge_page_buffer

from common import emit, median  # benchmarks/ is on sys.path: scripts run as `python benchmarks/x.py`


def _rates(buffer: torch.Tensor, reps: int, clock) -> list[float]:
    buffer.sum()  # warm-up
    rates = []
    for _ in range(reps):
        start = clock()
        buffer.sum()
        rates.append(buffer.numel() * 4 / (clock() - start) / 1e9)
    return rates


def read_bandwidth(num_bytes: int, threads: int, reps: int, clock=time.perf_counter) -> dict:
    """GB/s (1e9 bytes/s) of a threaded streaming read over `num_bytes`, on each page size, timed by
    `clock` (wall time; kernels_bench.py --clock cpu passes this thread's CPU time)."""
    torch.set_num_threads(threads)
    numel = num_bytes // 4
    pages = {"4k": torch.ones(numel, dtype=torch.float32)}  # touched: pages are resident
    if huge_pages.enabled():
        pages["2m"] = huge_page_buffer(numel * 4).view(torch.float32).fill_(1.0)
    by_page = {}
    for name, buffer in pages.items():
        rates = _rates(buffer, reps, clock)
        by_page[name] = {"best_gbps": max(rates), "median_gbps": median(rates), "samples_gbps": rates,
                         "huge_page_bytes": huge_pages.huge_page_bytes(buffer)}
    best = max(by_page, key=lambda name: by_page[name]["best_gbps"])
    return {"bytes": numel * 4, "threads": threads, "pages": best, **{k: by_page[best][k] for k in
            ("best_gbps", "median_gbps", "samples_gbps")}, "by_page": by_page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, required=True, help="buffer size (the weights' bytes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    emit(read_bandwidth(args.bytes, args.threads, args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
