"""`zili serve --in-process` (engine in the HTTP process, for debugging) serves the same tokens.

The default (engine process) is what every other test drives; this checks the other client
against it: greedy outputs, streamed and not, equal the shared server's (both fp32).
"""

from __future__ import annotations

import json

import httpx
from conftest import MODEL_NAME

BODY = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True}


def token_ids(url: str, stream: bool) -> list[int]:
    if not stream:
        return httpx.post(url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["token_ids"]
    ids = []
    with httpx.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    return ids


def test_in_process_engine_gives_the_same_tokens(server, start_server, serve_model):
    in_process = start_server("--in-process", "--max-model-len", "128", "--served-model-name", MODEL_NAME,
                              model=serve_model)
    expected = token_ids(server.url, stream=False)
    assert len(expected) == 12
    assert token_ids(in_process.url, stream=False) == expected
    assert token_ids(in_process.url, stream=True) == expected
    metrics = httpx.get(in_process.url + "/metrics").text
    assert "zili_engine_generation_tokens_total 24.0" in metrics
    assert in_process.stop() == 0
