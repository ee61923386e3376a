"""KV exhaustion preempts and recomputes; nothing crashes or leaks (RELIABILITY item 12).

A server with a 12-block KV pool (~190 tokens) gets 8 concurrent greedy requests needing ~5
blocks each. The engine must preempt (the metric shows it), every request must finish with the
same tokens it gets alone, and after the burst every block is free again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MODEL_NAME, engine_metrics, wait_for_metrics

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # layers x (k, v) x block tokens x kv heads x head dim x fp32


@pytest.fixture(scope="module")
def small_kv_server(start_server_session, serve_model):
    return start_server_session("--kv-cache-memory", str(12 * BLOCK_BYTES), "--max-model-len", "128",
                                "--served-model-name", MODEL_NAME, model=serve_model)


def greedy(url: str, index: int) -> list[int]:
    body = {"model": MODEL_NAME, "prompt": f"Request number {index} says", "max_tokens": 64, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_preemption_keeps_greedy_outputs_and_frees_blocks(small_kv_server):
    url = small_kv_server.url
    assert engine_metrics(url)["zili_engine_kv_blocks_total"] == 12
    alone = [greedy(url, i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: greedy(url, i), range(8)))
    assert together == alone
    metrics = wait_for_metrics(url, lambda m: m["zili_engine_num_running"] == 0)
    assert metrics["zili_engine_preemptions_total"] > 0
    assert metrics["zili_engine_kv_blocks_used"] == 0 and metrics["zili_engine_num_waiting"] == 0
