"""ProcessEngineClient: the engine in a child process, spoken to over a pipe in JSON lines.

Why a process: with OpenMP's busy-waiting compute threads, any other busy thread next to them
(the HTTP event loop, tokenization) made decode many times slower on 2-core machines. The child
(engine_worker.py) owns the model and the compute threads; this process only validates,
tokenizes and streams. No pickle crosses the pipe: messages are JSON (wire.py), and the child is
a fresh interpreter (subprocess), not a multiprocessing fork or spawn.

If the child dies, every in-flight request fails with EngineDeadError and `on_dead` fires (the
server then stops and exits non-zero).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys

from zili.errors import InvalidRequestError, ModelLoadError
from zili.serve import wire
from zili.serve.engine_client import EngineClient, EngineDeadError, ModelInfo, RequestFailedError

log = logging.getLogger("zili.serve")
SHUTDOWN_WAIT_S = 10.0
METRICS_TIMEOUT_S = 5.0


class ProcessEngineClient(EngineClient):
    def __init__(self, model: str, device: str | None = None, dtype: str | None = None,
                 engine_options: dict | None = None, faults: list[str] | None = None,
                 env: dict[str, str] | None = None):
        super().__init__()
        self.config = {"model": str(model), "device": device, "dtype": dtype,
                       "engine_options": engine_options or {}, "faults": faults or []}
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._metrics_waiters: dict[int, asyncio.Future] = {}
        self._seq = itertools.count()
        self._ready_future: asyncio.Future | None = None
        self._reader_task: asyncio.Task | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        env = {**os.environ, **self.env}
        # The compute threads should sleep, not spin, between steps: the HTTP process and the
        # child's own event loop need a core now and then (measured in benchmarks/serve_load.py).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zili.serve.engine_worker", json.dumps(self.config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=wire.MAX_LINE_BYTES)
        self._ready_future = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop())
        await self._ready_future  # raises ModelLoadError if loading failed

    def _send(self, message: dict) -> None:
        if self.dead or self.proc is None or self.proc.stdin.is_closing():
            return
        self.proc.stdin.write(wire.encode(message))

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                self._dispatch(wire.decode(line))
        except (ValueError, asyncio.LimitOverrunError, ConnectionError):
            log.error("the engine process sent an unreadable message")
        await self.proc.wait()
        self._engine_gone()

    def _dispatch(self, message: dict) -> None:
        op = message.get("op")
        if op in ("output", "error"):
            queue = self._streams.get(message["id"])
            if queue is not None:
                queue.put_nowait(message)
        elif op == "metrics":
            waiter = self._metrics_waiters.pop(message["seq"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message["data"])
        elif op == "ready":
            self.info = ModelInfo(**message["info"])
            self.ready = True
            self._ready_future.set_result(None)
        elif op == "load_error":
            if not self._ready_future.done():
                self._ready_future.set_exception(ModelLoadError(message["message"]))
        elif op == "fatal":
            log.error("engine process: %s", message.get("message"))

    def _engine_gone(self) -> None:
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(ModelLoadError(
                f"the engine process exited while loading (code {self.proc.returncode})"))
        was_ready = self.ready
        self.ready = False
        if self._stopping:
            self.dead = True
            return
        if was_ready:
            log.error("the engine process exited unexpectedly (code %s)", self.proc.returncode)
        for queue in self._streams.values():
            queue.put_nowait({"op": "dead"})
        for waiter in self._metrics_waiters.values():
            if not waiter.done():
                waiter.set_exception(EngineDeadError("the engine has stopped"))
        self._mark_dead()

    async def generate(self, request_id, prompt_token_ids, params, prompt=None):
        self.check_available()
        if request_id in self._streams:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        decoder = wire.OutputDecoder(request_id, prompt, prompt_token_ids)
        finished = False
        try:
            self._send({"op": "generate", "id": request_id, "prompt_token_ids": list(prompt_token_ids),
                        "params": wire.params_to_dict(params), "prompt": prompt})
            while not finished:
                message = await queue.get()
                op = message["op"]
                if op == "dead":
                    raise EngineDeadError("the engine has stopped")
                if op == "error":
                    finished = True
                    if message["kind"] == "invalid_request":
                        error = InvalidRequestError(message["message"], param=message.get("param"))
                        error.code = message.get("code")
                        raise error
                    raise RequestFailedError(message["message"])
                output = decoder.apply(message)
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send({"op": "abort", "id": request_id})

    def abort(self, request_id: str) -> None:
        self._send({"op": "abort", "id": request_id})

    async def metrics(self) -> dict:
        self.check_available()
        seq = next(self._seq)
        waiter = asyncio.get_running_loop().create_future()
        self._metrics_waiters[seq] = waiter
        self._send({"op": "metrics", "seq": seq})
        try:
            return await asyncio.wait_for(waiter, METRICS_TIMEOUT_S)
        finally:
            self._metrics_waiters.pop(seq, None)

    async def shutdown(self) -> None:
        """Ask the child to stop; kill it if it does not within SHUTDOWN_WAIT_S. Leaves no process."""
        self._stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self._send({"op": "shutdown"})
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), SHUTDOWN_WAIT_S)
        except (asyncio.TimeoutError, ConnectionError):
            self.proc.kill()
            await self.proc.wait()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
