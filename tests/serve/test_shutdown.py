"""Graceful SIGTERM: intake stops, in-flight work drains, exit 0, no child left (RELIABILITY item 14).

Four client threads loop over streamed and plain requests. After each has finished one, the
server gets SIGTERM. Every request ends either complete (a finish_reason / [DONE]) or refused
before it started (connection refused, or 503 while draining); none is cut off mid-response.
"""

from __future__ import annotations

import json
import signal
import threading

import httpx
import psutil
from conftest import MODEL_NAME


class LoopingClient(threading.Thread):
    def __init__(self, url: str, stream: bool, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.stream, self.stop_event = url, stream, stop
        self.outcomes: list[str] = []
        self.first_done = threading.Event()

    def one_request(self, client: httpx.Client) -> str:
        body = {"model": MODEL_NAME, "prompt": "Tell me", "max_tokens": 24, "ignore_eos": True,
                "stream": self.stream}
        started = False
        try:
            with client.stream("POST", self.url + "/v1/completions", json=body) as response:
                started = True
                if response.status_code == 503:
                    return "refused"
                text = response.read().decode()
                if response.status_code != 200:
                    return f"status {response.status_code}"
                if self.stream:
                    return "ok" if text.rstrip().endswith("data: [DONE]") and '"error"' not in text else "truncated"
                return "ok" if json.loads(text)["choices"][0]["finish_reason"] == "length" else "bad body"
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as error:
            return "refused" if not started else f"cut off: {type(error).__name__}"

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop_event.is_set():
                outcome = self.one_request(client)
                self.outcomes.append(outcome)
                self.first_done.set()
                if outcome == "refused":
                    return


def test_sigterm_drains_and_exits_cleanly(start_server, serve_model):
    server = start_server("--served-model-name", MODEL_NAME, "--drain-timeout", "60", model=serve_model)
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "the engine runs in a child process"
    stop = threading.Event()
    clients = [LoopingClient(server.url, stream=i % 2 == 0, stop=stop) for i in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        assert client.first_done.wait(120)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0
    stop.set()
    for client in clients:
        client.join(60)
    outcomes = [o for client in clients for o in client.outcomes]
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    assert outcomes.count("ok") >= 4
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []
    assert "Traceback" not in server.logs()
