"""AsyncLLMEngine: the engine behind an asyncio server.

One background thread owns the LLMEngine and runs `step()` while there is work, sleeping
otherwise. Other threads never touch the engine's state: `generate` and `abort` post commands to
a queue the engine thread drains before every step, and outputs travel back to each request's
asyncio queue with `loop.call_soon_threadsafe`.

Failures: when a step fails (EngineStepError), only the requests of that batch are aborted and
their generators raise the error; the loop keeps serving the others. An unexpected error outside
a batch fails every request in flight and the loop still continues.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from zili.engine.llm_engine import EngineStepError, LLMEngine
from zili.engine.metrics import EngineMetrics
from zili.errors import InvalidRequestError, ZiliError
from zili.outputs import RequestOutput
from zili.sampling_params import SamplingParams


class EngineDeadError(ZiliError):
    """The engine was shut down or its thread died; no new request can run."""


class _Stream:
    """Where one request's outputs go: an asyncio queue fed from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


def _put_all(batch: list[tuple[str, _Stream, RequestOutput | BaseException]]) -> None:
    for _, stream, item in batch:
        stream.queue.put_nowait(item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._commands: deque[tuple] = deque()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._metrics = engine.metrics()

    @classmethod
    def from_folder(cls, path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                    **engine_options) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_folder(path, device=device, dtype=dtype, **engine_options))

    # ---- caller side (any thread / event loop) --------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots; the last has finished=True. Leaving early aborts the request.

        Raises InvalidRequestError (on the first iteration) when the request cannot run, and the
        engine's error when the batch it was in failed.
        """
        if not self.is_healthy():
            raise EngineDeadError("the engine is not running")
        self.engine.check_request(prompt_token_ids, params, strict_max_tokens=True)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._streams[request_id] = stream
            self._commands.append(("add", request_id, list(prompt_token_ids), params, prompt))
        self._start()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks (before the engine's next step). Idempotent."""
        with self._lock:
            self._commands.append(("abort", request_id))
        self._wakeup.set()

    def metrics(self) -> EngineMetrics:
        """Snapshot taken by the engine thread after its latest step."""
        return self._metrics

    def is_healthy(self) -> bool:
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the engine thread."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # ---- engine thread --------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="zili-engine", daemon=True)
                self._thread.start()
        self._wakeup.set()

    def _loop(self) -> None:
        while True:
            self._drain_commands()
            if self._stopping:
                for request_id in list(self.engine.requests):
                    self._abort_now(request_id)
                self._metrics = self.engine.metrics()
                return
            if not self.engine.has_unfinished_requests():
                self._metrics = self.engine.metrics()
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            self._step()

    def _drain_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            if command[0] == "abort":
                self._abort_now(command[1])
                continue
            _, request_id, prompt_token_ids, params, prompt = command
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, prompt, strict_max_tokens=True)
            except Exception as error:  # validated before, so only a racing duplicate id lands here
                self._deliver(request_id, error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as error:
            for request_id in error.request_ids:
                self.engine.abort_request(request_id)
                self._deliver(request_id, error)
            outputs = error.outputs
        except Exception as error:  # a bug outside any batch: fail everyone, keep serving
            failure = EngineStepError(list(self.engine.requests), error)
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
                self._deliver(request_id, failure)
            outputs = []
        self._deliver_all([(output.request_id, output) for output in outputs])
        self._metrics = self.engine.metrics()

    def _abort_now(self, request_id: str) -> None:
        final = self.engine.abort_request(request_id)
        if final is not None:
            self._deliver(request_id, final)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams with one wake-up per event loop (not one per request): the
        consumer's thread then takes the GIL once per step instead of once per sequence."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, _Stream, RequestOutput | BaseException]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((request_id, stream, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the consumer's event loop is closed
                for request_id, _, _ in batch:
                    self.engine.abort_request(request_id)
