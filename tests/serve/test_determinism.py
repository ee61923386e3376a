"""Same prompt, params and seed -> the same tokens, whatever runs beside it (RELIABILITY item 13).

A seeded sampled "needle" request is compared across repeated runs, inside batches of random
requests at different positions, streamed vs not, and with its prompt prefix cached vs not.
(Test servers compute in fp32; see conftest.py.)
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import MODEL_NAME, engine_metrics
from tiny_models import TRAINING_TEXT

NEEDLE_PROMPT = " ".join(TRAINING_TEXT.split()[:12])  # ~40 tokens: two whole KV blocks and more
NEEDLE = {"model": MODEL_NAME, "prompt": NEEDLE_PROMPT, "max_tokens": 16, "temperature": 0.9, "top_p": 0.95,
          "seed": 1234, "n": 2, "ignore_eos": True, "return_token_ids": True}


def run(url: str, body: dict) -> list[list[int]]:
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [c["token_ids"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]


def run_stream(url: str, body: dict) -> list[list[int]]:
    ids: dict[int, list[int]] = {}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    ids.setdefault(choice["index"], []).extend(choice["token_ids"])
    return [ids[i] for i in sorted(ids)]


def random_request(rng: random.Random) -> dict:
    words = TRAINING_TEXT.split()
    start = rng.randrange(len(words) - 30)
    return {"model": MODEL_NAME, "prompt": " ".join(words[start:start + rng.randrange(2, 10)]),
            "max_tokens": rng.randrange(4, 40), "temperature": rng.choice([0.0, 0.7, 1.3]),
            "seed": rng.randrange(10**6), "n": rng.choice([1, 2]), "ignore_eos": True, "return_token_ids": True}


def test_seeded_needle_is_identical_everywhere(server):
    reference = run(server.url, NEEDLE)
    assert len(reference) == 2 and all(len(ids) == 16 for ids in reference)
    assert reference[0] != reference[1]  # the two completions use different seeds (seed + index)
    assert run(server.url, NEEDLE) == reference  # again, now with the prompt's blocks cached
    assert run_stream(server.url, NEEDLE) == reference
    rng = random.Random(0)
    for position in (0, 3, 6):
        others = [random_request(rng) for _ in range(6)]
        with ThreadPoolExecutor(7) as pool:
            futures = [pool.submit(run, server.url, body) for body in others[:position]]
            needle = pool.submit(run_stream if position == 3 else run, server.url, NEEDLE)
            futures += [pool.submit(run, server.url, body) for body in others[position:]]
            assert needle.result() == reference, f"needle at position {position}"
            for future in futures:
                future.result()


def test_prefix_cache_hit_or_miss_gives_the_same_tokens(server):
    body = {**NEEDLE, "prompt": NEEDLE_PROMPT + " and then", "seed": 99, "n": 1}
    first = run(server.url, body)  # the needle prefix is cached from the test above or from now on
    second = run(server.url, body)  # whole-prompt blocks hit
    greedy = {**body, "temperature": 0.0}
    assert first == second
    assert run(server.url, greedy) == run_stream(server.url, greedy)
    assert engine_metrics(server.url)["zili_engine_prefix_cache_hit_rate"] > 0
