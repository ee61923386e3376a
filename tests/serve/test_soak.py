"""Bounded soak: mixed requests with random client aborts; every request is accounted for (item 8).

Each request ends as one of: complete (a finish_reason for every choice; streams end with
[DONE]), an error envelope (streams: error event, then [DONE]), or aborted by the client. After
the soak no KV block is in use, nothing runs, and the server's memory is flat. The default
variant sends 120 requests; the `slow` one 400. Also: SSE keep-alive comments while idle.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from conftest import MODEL_NAME, wait_for_metrics
from fake_engine import AppServer, SlowFakeEngine
from tiny_models import tokenizer_vocab_size

MIB = 1024 * 1024


def random_request(rng: random.Random) -> tuple[str, dict, float | None, int | None]:
    """(path, body, client timeout for non-stream aborts, chunks to read before a stream abort)."""
    n = rng.choice([1, 1, 2])
    common = {"model": MODEL_NAME, "max_tokens": rng.randrange(1, 40), "n": n, "stream": rng.random() < 0.5,
              "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(1000)}
    if rng.random() < 0.5:
        path, body = "/v1/completions", {**common, "prompt": rng.choice(["Once", "The dog", "Numbers like"])}
    else:
        path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": "Hi"}]}
    abort = rng.random() < 0.25
    timeout = rng.uniform(0.02, 0.3) if abort and not body["stream"] else None
    chunks = rng.randrange(1, 5) if abort and body["stream"] else None
    return path, body, timeout, chunks


def run_one(url: str, request) -> str:
    path, body, abort_timeout, abort_after_chunks = request
    try:
        with httpx.Client(base_url=url, timeout=abort_timeout or 120) as client:
            if not body["stream"]:
                response = client.post(path, json=body)
                if response.status_code != 200:
                    return "error" if "error" in response.json() else "bad error body"
                choices = response.json()["choices"]
                complete = len(choices) == body["n"] and all(c["finish_reason"] in ("stop", "length") for c in choices)
                return "complete" if complete else "incomplete"
            events = []
            with client.stream("POST", path, json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if abort_after_chunks is not None and len(events) >= abort_after_chunks:
                            return "aborted"
            if not events or events[-1] != "[DONE]":
                return "stream without [DONE]"
            payloads = [json.loads(e) for e in events[:-1]]
            if payloads and "error" in payloads[-1]:
                return "error"
            finishes = [c["index"] for p in payloads for c in p.get("choices", []) if c.get("finish_reason")]
            return "complete" if sorted(finishes) == list(range(body["n"])) else "incomplete stream"
    except httpx.TimeoutException:
        return "aborted" if abort_timeout is not None else "timeout"


def soak(server, num_requests: int) -> None:
    engine = psutil.Process(server.engine_pid())
    http = psutil.Process(server.proc.pid)
    rng = random.Random(num_requests)
    warmup = [random_request(rng) for _ in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: run_one(server.url, r), warmup))
    wait_for_metrics(server.url, lambda m: m["zili_http_requests_running"] == 0)
    rss_before = http.memory_info().rss, engine.memory_info().rss
    requests = [random_request(rng) for _ in range(num_requests)]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda r: run_one(server.url, r), requests))
    assert set(outcomes) <= {"complete", "aborted", "error"}, sorted(set(outcomes))
    assert outcomes.count("complete") > num_requests // 2 and "aborted" in outcomes
    assert "error" not in outcomes  # nothing in this mix should fail
    metrics = wait_for_metrics(server.url, lambda m: m["zili_http_requests_running"] == 0
                               and m["zili_engine_num_running"] == 0)
    assert metrics["zili_engine_kv_blocks_used"] == 0 and metrics["zili_engine_num_waiting"] == 0
    rss_after = http.memory_info().rss, engine.memory_info().rss
    assert rss_after[0] - rss_before[0] < 30 * MIB and rss_after[1] - rss_before[1] < 30 * MIB, (rss_before,
                                                                                                 rss_after)


def test_soak_short(server):
    soak(server, 120)


@pytest.mark.slow
def test_soak_long(server):
    soak(server, 400)


@pytest.mark.timeout(60)
def test_idle_stream_gets_keepalive_comments(serve_model):
    engine = SlowFakeEngine(tokenizer_vocab_size())
    with AppServer(serve_model, engine, served_model_names=["m"], keepalive_s=0.1) as server:
        lines, opened = [], threading.Event()

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                body = {"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        lines.append(line)
                        if line.startswith(": keep-alive") and not opened.is_set():
                            opened.set()
                            engine.open_gate()

        asyncio.run(scenario())
    assert lines[0] == ": keep-alive"
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[0])["choices"][0]["text"] == "ok"
