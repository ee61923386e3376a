"""An in-process server around a fake engine, for tests that must control the engine's pace.

`SlowFakeEngine` holds every request at a gate until the test opens it, then answers "ok".
`AppServer` runs create_app (the real app: middleware, admission, routes) under uvicorn in a
background thread on a free loopback port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import uvicorn

from zili.outputs import CompletionOutput, RequestOutput
from zili.serve.app import create_app
from zili.serve.engine_client import EngineClient, ModelInfo
from zili.serve.settings import ServeSettings


class SlowFakeEngine(EngineClient):
    def __init__(self, vocab_size: int, max_model_len: int = 128, gate_open: bool = False):
        super().__init__()
        self.gate_open = gate_open
        self._info = ModelInfo(max_model_len=max_model_len, vocab_size=vocab_size, eos_token_ids=[])
        self.gate: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = 0
        self.first_started = threading.Event()
        self.aborted: list[str] = []

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.gate = asyncio.Event()
        if self.gate_open:
            self.gate.set()
        self.info = self._info
        self.ready = True

    def open_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.set)

    async def generate(self, request_id, prompt_token_ids, params, prompt=None):
        self.started += 1
        self.first_started.set()
        finished = False
        try:
            await self.gate.wait()
            finished = True
            yield RequestOutput(request_id, prompt, list(prompt_token_ids),
                                [CompletionOutput(i, "ok", [5], "stop") for i in range(params.n)], finished=True)
        finally:
            if not finished:
                self.aborted.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def metrics(self) -> dict:
        return {}

    async def shutdown(self) -> None:
        if self.gate is not None:
            self.gate.set()


class AppServer:
    """create_app(settings, engine) served by uvicorn in a thread; use as a context manager."""

    def __init__(self, model: Path, engine: EngineClient, **settings):
        self.settings = ServeSettings(model=Path(model), **settings)
        self.engine = engine
        self.app = create_app(self.settings, engine)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False, http="h11",
                                                    lifespan="on", ws="none"))
        self.thread = threading.Thread(target=lambda: self.server.run(sockets=[self.sock]), daemon=True)

    @property
    def state(self):
        return self.app.state.zili

    def __enter__(self) -> "AppServer":
        self.thread.start()
        while not (self.server.started and self.engine.ready):
            if not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
