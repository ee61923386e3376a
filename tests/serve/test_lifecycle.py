"""Liveness and readiness through a server's life; a dead engine stops the server (item 15).

The engine process is held before loading (test-mode fault `hold-load:FILE`): /health answers,
/ready and generation say 503 "loading". Once the file exists the server turns ready. Then a
request carrying FAULT_CRASH_MARKER kills the engine process (`crash-on-prompt`): the stream in
flight ends with an error event and [DONE], and the server exits with a non-zero status.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import psutil
import pytest
from conftest import MODEL_NAME
from fake_engine import AppServer, SlowFakeEngine
from tiny_models import tokenizer_vocab_size

from zili.serve.engine_worker import FAULT_CRASH_MARKER


def test_loading_ready_and_engine_death(start_server, serve_model, tmp_path):
    go = tmp_path / "go"
    server = start_server("--served-model-name", MODEL_NAME, "--fault-injection", f"hold-load:{go}",
                          "--fault-injection", "crash-on-prompt", model=serve_model, ready=False)
    assert httpx.get(server.url + "/health").status_code == 200
    loading = httpx.get(server.url + "/ready")
    assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
    assert loading.headers["retry-after"].isdigit()
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    assert info.value.status_code == 503
    assert client.models.list().data[0].id == MODEL_NAME  # metadata is served while loading

    go.touch()
    server.wait_ready()
    assert httpx.get(server.url + "/ready").status_code == 200
    engine = psutil.Process(server.engine_pid())

    first_chunk, events = threading.Event(), []

    def long_stream():
        body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()
        first_chunk.set()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert first_chunk.wait(60)
    try:
        httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": f"{FAULT_CRASH_MARKER} now", "max_tokens": 2})
    except httpx.HTTPError:
        pass  # the server may close the connection as it stops
    streamer.join(60)
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert server.proc.wait(60) != 0
    assert not engine.is_running()
    assert "the engine process stopped" in server.logs()


def test_ready_is_503_when_the_engine_is_dead_or_draining(serve_model):
    engine = SlowFakeEngine(tokenizer_vocab_size())
    with AppServer(serve_model, engine, served_model_names=["m"]) as server:
        assert httpx.get(server.url + "/ready").status_code == 200
        engine.dead = True
        dead = httpx.get(server.url + "/ready")
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"
        completion = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi"})
        assert completion.status_code == 503
        engine.dead = False
        server.state.draining = True
        draining = httpx.get(server.url + "/ready")
        assert draining.status_code == 503 and draining.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/health").status_code == 200
