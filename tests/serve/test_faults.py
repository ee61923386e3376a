"""Failures stay with their request (RELIABILITY items 10, 11).

The shared server runs with the test-mode fault `raise-at-token:3`: a request whose prompt holds
FAULT_RAISE_MARKER fails in the engine process once it has 3 tokens. Its stream must end with an
error event and then [DONE]; streams and requests running beside it must finish with outputs
byte-identical to a run without the poison.

`engine-raise-at-token:2` raises inside the engine's step (engine.fault_hook), which fails the
whole batch the request is in (the engine's contract: a failed forward pass cannot be pinned on
one sequence). Every stream must still end with [DONE], and the engine must keep serving.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import MODEL_NAME

from zili.serve.engine_worker import FAULT_ENGINE_MARKER, FAULT_RAISE_MARKER

GOOD_PROMPTS = ["The quick brown fox", "Once upon a time", "Hello world! How are", "Numbers like 1, 2, 3"]


def stream_completion(url: str, prompt: str, max_tokens: int = 12) -> list[str]:
    """The data payloads of one streamed completion, in order."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def stream_text(events: list[str]) -> str:
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


def non_stream(url: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    return httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "temperature": 0, "max_tokens": 12,
                                                     "ignore_eos": True, **body}, timeout=60)


def test_failure_mid_stream_sends_error_then_done(server):
    baseline = {p: stream_text(stream_completion(server.url, p)) for p in GOOD_PROMPTS}
    poison = f"{FAULT_RAISE_MARKER} tell me a story"
    with ThreadPoolExecutor(len(GOOD_PROMPTS) + 1) as pool:
        futures = {p: pool.submit(stream_completion, server.url, p) for p in [poison, *GOOD_PROMPTS]}
        results = {p: f.result() for p, f in futures.items()}
    failed = results[poison]
    assert failed[-1] == "[DONE]"
    error = json.loads(failed[-2])
    assert set(error) == {"error"} and error["error"]["type"] == "internal_error"
    assert "Traceback" not in error["error"]["message"] and FAULT_RAISE_MARKER not in error["error"]["message"]
    assert all("error" not in json.loads(e) for e in failed[:-2])  # tokens before the fault came through
    for prompt in GOOD_PROMPTS:
        assert results[prompt][-1] == "[DONE]"
        assert stream_text(results[prompt]) == baseline[prompt]


def test_poison_requests_fail_alone(server):
    baseline = {p: non_stream(server.url, {"prompt": p}).json()["choices"][0]["text"] for p in GOOD_PROMPTS}
    poisons = [
        {"prompt": f"{FAULT_RAISE_MARKER} again"},                      # fails in the engine
        {"prompt": "x", "temperature": "hot"},                          # bad schema
        {"prompt": [1, 10**6]},                                         # token id outside the vocabulary
        {"prompt": "word " * 300},                                      # longer than the context
        b'{"model": "tiny", "prompt": "hi", "logit_bias": {"1": Infinity}}',  # non-finite bias
    ]
    with ThreadPoolExecutor(len(GOOD_PROMPTS) + len(poisons)) as pool:
        good = {p: pool.submit(non_stream, server.url, {"prompt": p}) for p in GOOD_PROMPTS}
        bad = [pool.submit(non_stream, server.url, body) for body in poisons]
        good = {p: f.result() for p, f in good.items()}
        bad = [f.result() for f in bad]
    assert bad[0].status_code == 500 and bad[0].json()["error"]["code"] == "internal_error"
    assert [r.status_code for r in bad[1:]] == [400, 400, 400, 400]
    for prompt, response in good.items():
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == baseline[prompt]
    assert httpx.get(server.url + "/ready").status_code == 200


def test_engine_step_failure_ends_every_affected_stream_and_the_engine_survives(server):
    baseline = stream_text(stream_completion(server.url, GOOD_PROMPTS[0]))
    poison = f"{FAULT_ENGINE_MARKER} crash the batch"
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream_completion, server.url, p) for p in (poison, *GOOD_PROMPTS[:2])]
        results = [f.result() for f in futures]
    assert results[0][-1] == "[DONE]" and "error" in json.loads(results[0][-2])
    for events in results[1:]:  # batch-mates may fail with it, but every stream is closed properly
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" in last or last["choices"][0]["finish_reason"] == "length"
    assert stream_text(stream_completion(server.url, GOOD_PROMPTS[0])) == baseline
    assert httpx.get(server.url + "/ready").status_code == 200
