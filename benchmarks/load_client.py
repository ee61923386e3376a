"""Concurrent streaming load against any OpenAI-compatible `/v1/completions` server.

The same client drives `zili serve` and `llama-server`, so their figures are comparable:
N concurrent streams, each a distinct short prompt and a fixed number of new tokens
(`ignore_eos`, greedy). Per request: TTFT (send -> first token chunk) and TPOT ((last token -
first token) / (tokens - 1)); per round: throughput = all new tokens / wall time. Token counts
come from the final usage chunk when the server sends one, else from the number of chunks.

The client is aiohttp: it shares the 2 cores with the server under test, and per streamed token it
costs about a third of httpx's CPU (31 vs 101-119 us with the tiny demo model, 124 vs 275-285 us
under the benchmark's load), time the server's compute threads would otherwise lose to it. It comes with
the dev extras (pyproject.toml), which `make bench` installs before benchmarks/run.py imports this module.

    python benchmarks/load_client.py --base-url http://127.0.0.1:8000 --model m --streams 16 --reps 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import aiohttp

from common import emit, median, percentile


def make_prompts(count: int, words: int, seed: int = 0) -> list[str]:
    """Distinct prompts (no shared prefix beyond a word, so no prefix cache skips work)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(words))
            for _ in range(count)]


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    sent = time.perf_counter()
    token_times: list[float] = []
    usage_tokens = None
    async with session.post(url, json=body) as response:
        if response.status != 200:
            detail = (await response.read()).decode(errors="replace")[:300]
            raise RuntimeError(f"HTTP {response.status}: {detail}")
        async for line in response.content:  # one SSE line at a time
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                token_times.append(time.perf_counter())
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
    tokens = usage_tokens if usage_tokens is not None else len(token_times)
    if not token_times:
        raise RuntimeError("the stream carried no tokens")
    ttft = token_times[0] - sent
    tpot = (token_times[-1] - token_times[0]) / max(tokens - 1, 1)
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens, "e2e_s": token_times[-1] - sent}


async def one_round(base_url: str, model: str, prompts: list[str], max_tokens: int, timeout_s: float) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    connector = aiohttp.TCPConnector(limit=len(prompts) + 4)
    async with aiohttp.ClientSession(base_url=base_url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        requests = await asyncio.gather(*(one_stream(session, "/v1/completions", {**body, "prompt": p})
                                          for p in prompts))
        wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in requests)
    return {"wall_s": wall, "tokens": total, "throughput_tok_s": total / wall, "requests": requests}


def summarize(rounds: list[dict], streams: int, max_tokens: int) -> dict:
    """Median throughput over rounds; TTFT / TPOT percentiles pooled over every request of every round."""
    requests = [r for rnd in rounds for r in rnd["requests"]]
    ttft = [r["ttft_s"] for r in requests]
    tpot = [r["tpot_s"] for r in requests]
    return {
        "streams": streams, "max_tokens": max_tokens, "reps": len(rounds),
        "throughput_tok_s": median([rnd["throughput_tok_s"] for rnd in rounds]),
        "throughput_samples": [rnd["throughput_tok_s"] for rnd in rounds],
        "tokens_per_request": sorted({r["tokens"] for r in requests}),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
    }


def run_load(base_url: str, model: str, streams: int, max_tokens: int, reps: int, prompt_words: int,
             timeout_s: float = 1800.0, seed: int = 0, keep_requests: bool = False) -> dict:
    """`reps` rounds of `streams` concurrent requests (prompts seeded seed, seed + 1, ...).
    keep_requests: also return the raw rounds, so callers can pool rounds from several runs."""
    # warm-up: one short request so the first round does not pay one-time costs
    asyncio.run(one_round(base_url, model, make_prompts(1, prompt_words, seed=999), 4, timeout_s))
    rounds = [asyncio.run(one_round(base_url, model, make_prompts(streams, prompt_words, seed=seed + rep),
                                    max_tokens, timeout_s)) for rep in range(reps)]
    result = summarize(rounds, streams, max_tokens)
    if keep_requests:
        result["rounds"] = [{"throughput_tok_s": r["throughput_tok_s"], "requests": r["requests"]} for r in rounds]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True, help="the `model` field of each request")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="prompt seed of the first round")
    parser.add_argument("--keep-requests", action="store_true", help="include every request's timings")
    args = parser.parse_args(argv)
    emit(run_load(args.base_url, args.model, args.streams, args.max_tokens, args.reps, args.prompt_words,
                  seed=args.seed, keep_requests=args.keep_requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
