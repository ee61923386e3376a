"""Prompts and secrets stay out of logs; nothing leaks a traceback (RELIABILITY item 22).

Good, bad and failing requests all carry a marker in their prompt text; afterwards neither the
server's log (HTTP and engine processes) nor any response body contains it where it should not.
"""

from __future__ import annotations

import json

import httpx
from conftest import MODEL_NAME
from test_errors import CASES, LEAK_PATTERNS

from zili.serve.engine_worker import FAULT_ENGINE_MARKER, FAULT_RAISE_MARKER

MARKER = "PROMPT-SECRET-7f3a9c"


def with_marker(kwargs: dict) -> dict:
    """The same request with the marker in its prompt or message text, where it has one."""
    body = kwargs.get("json")
    if not isinstance(body, dict):
        return kwargs
    body = json.loads(json.dumps(body))
    if isinstance(body.get("prompt"), str):
        body["prompt"] = f"{MARKER} {body['prompt']}"
    for message in body.get("messages", []) if isinstance(body.get("messages"), list) else []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            message["content"] = f"{MARKER} {message['content']}"
    return {**kwargs, "json": body}


def test_prompts_stay_out_of_logs_and_responses(server, http):
    requests = [("POST", "/v1/completions", {"json": {"model": MODEL_NAME, "prompt": f"{MARKER} hi",
                                                      "max_tokens": 3, "stream": stream}}) for stream in (0, 1)]
    requests += [("POST", "/v1/chat/completions", {"json": {"model": MODEL_NAME, "max_tokens": 3, "messages": [
        {"role": "user", "content": f"{MARKER} {fault}"}], "stream": True}})
        for fault in ("", FAULT_RAISE_MARKER, FAULT_ENGINE_MARKER)]
    requests += [(method, path, with_marker(kwargs)) for _, method, path, kwargs, _, _ in CASES]
    for method, path, kwargs in requests:
        response = http.request(method, path, **kwargs)
        if response.status_code >= 400 or '"error"' in response.text:
            assert MARKER not in response.text
            for pattern in LEAK_PATTERNS:
                assert not pattern.search(response.text), (pattern.pattern, response.text)
    logs = server.logs()
    assert MARKER not in logs
    assert "Traceback" not in logs
    assert httpx.get(server.url + "/health").status_code == 200
