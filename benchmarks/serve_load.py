"""Decode through `zili serve` vs offline, and N concurrent streams through the server.

What it answers (issue: compute placement): is single-stream decode through the HTTP server as
fast as offline, with the engine in its own process (the default) and, for contrast, in the
HTTP process (--in-process)? And what do N concurrent streams of T tokens get: throughput,
TTFT and TPOT p50/p99.

    # start a server on MODEL, measure, stop it; --offline adds the offline single-stream figure
    python benchmarks/serve_load.py --model benchmarks/work/model --concurrency 16 --tokens 128 --offline
    # or load a server that is already running (any OpenAI-compatible /v1/completions)
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --served-name m --concurrency 16

The client is benchmarks/load_client.py (shared with the peer comparison in benchmarks/run.py):
greedy, ignore_eos, streamed; TTFT = send -> first token chunk, TPOT = (last - first token) /
(tokens - 1). Single-stream decode tok/s = 1 / TPOT, offline measured the same way (per-token
timestamps of the engine's step loop after a 16-token prompt). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

from common import REPO_DIR, emit, median
from load_client import run_load

LISTEN_RE = re.compile(r"zili: listening on (http://\S+)")


def offline_decode_tok_s(model: str, tokens: int, reps: int, threads: int) -> float:
    """Batch-1 decode tok/s of the engine in this process, no HTTP (the reference for the ratio)."""
    import torch

    from zili.engine.llm_engine import LLMEngine
    from zili.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine.from_folder(model, max_num_seqs=16)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rates = []
    for rep in range(reps + 1):  # the first run warms up
        engine.add_request(f"r{rep}", [100 + (rep * 7 + i) % 500 for i in range(16)], params)
        times = []
        while engine.has_unfinished_requests():
            if engine.step():
                times.append(time.perf_counter())
        if rep:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
    return median(rates)


def server_env(threads: int, omp_wait_policy: str | None, server: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    elif not server:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the server's engine process gets by default
    return env


def offline_in_child(args) -> float:
    """The offline figure in a fresh interpreter with the server's OpenMP settings."""
    command = [sys.executable, __file__, "--offline-only", "--model", args.model, "--tokens", str(args.tokens),
               "--reps", str(args.reps), "--threads", str(args.threads)]
    env = server_env(args.threads, args.omp_wait_policy, server=False)
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["offline_decode_tok_s"]


class Server:
    def __init__(self, model: str, name: str, max_num_seqs: int, threads: int, in_process: bool,
                 omp_wait_policy: str | None):
        env = server_env(threads, omp_wait_policy, server=True)
        command = [sys.executable, "-m", "zili.cli", "serve", model, "--port", "0", "--served-model-name", name,
                   "--max-num-seqs", str(max_num_seqs), "--max-queue", "256", "--no-access-log"]
        if in_process:
            command.append("--in-process")
        self.proc = subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.url = None
        for line in self.proc.stdout:
            match = LISTEN_RE.search(line)
            if match:
                self.url = match.group(1)
            if line.startswith("zili: ready"):
                break
        if self.url is None or self.proc.poll() is not None:
            raise RuntimeError("zili serve did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def measure(base_url: str, name: str, concurrency: int, tokens: int, reps: int) -> dict:
    single = run_load(base_url, name, 1, tokens, reps, prompt_words=8)
    result = {"single_stream_decode_tok_s": 1 / single["tpot_p50_s"], "single_stream": single}
    if concurrency > 1:
        result["concurrent"] = run_load(base_url, name, concurrency, tokens, max(1, reps // 2), prompt_words=8)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="a running server; otherwise --model starts one")
    parser.add_argument("--served-name", default="bench", help="the `model` field of the requests")
    parser.add_argument("--model", help="model folder for the server this script starts")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="engine in the HTTP process (contrast)")
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default=None,
                        help="override the server's OpenMP wait policy (default: zili's choice)")
    parser.add_argument("--offline", action="store_true",
                        help="also time offline single-stream decode (child process, same OpenMP settings)")
    parser.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.offline_only:
        emit({"offline_decode_tok_s": offline_decode_tok_s(args.model, args.tokens, args.reps, args.threads)})
        return 0
    result = {"concurrency": args.concurrency, "tokens": args.tokens, "threads": args.threads,
              "mode": "in-process" if args.in_process else "engine process",
              "omp_wait_policy": args.omp_wait_policy or "default"}
    if args.base_url:
        result.update(measure(args.base_url, args.served_name, args.concurrency, args.tokens, args.reps))
    else:
        if not args.model:
            parser.error("give --base-url or --model")
        server = Server(args.model, args.served_name, max(args.concurrency, 1), args.threads, args.in_process,
                        args.omp_wait_policy)
        try:
            result.update(measure(server.url, args.served_name, args.concurrency, args.tokens, args.reps))
        finally:
            server.stop()
    if args.offline and args.model:
        offline = offline_in_child(args)
        result["offline_decode_tok_s"] = offline
        result["server_vs_offline"] = result["single_stream_decode_tok_s"] / offline
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
