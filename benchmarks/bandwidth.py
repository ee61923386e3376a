"""Memory read bandwidth over a buffer the size of the model's weights (the decode bound).

Batch-1 decode reads every weight once per token, so tok/s <= bandwidth / weight bytes. The
buffer must be as large as the weights: a large shared L3 makes small buffers read faster.
A float32 sum is a streaming read with almost no compute; the best of the repetitions is the
bound (the median is reported next to it).

    python benchmarks/bandwidth.py --bytes 774000000 --threads 2 --reps 5
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import emit, median  # benchmarks/ is on sys.path: scripts run as `python benchmarks/x.py`


def read_bandwidth(num_bytes: int, threads: int, reps: int) -> dict:
    """GB/s (1e9 bytes/s) of a threaded streaming read over `num_bytes`."""
    torch.set_num_threads(threads)
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32)  # touched: pages are resident
    buffer.sum()  # warm-up
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        buffer.sum()
        rates.append(buffer.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return {"bytes": buffer.numel() * 4, "threads": threads, "best_gbps": max(rates),
            "median_gbps": median(rates), "samples_gbps": rates}


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
