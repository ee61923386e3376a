"""Running jobs on the engine for one HTTP request: merged outputs, deltas, disconnects, SSE.

- `merged_outputs` runs each job (one engine request) in its own task and yields
  (job index, cumulative RequestOutput) in arrival order; closing it aborts every job.
- `DeltaTracker` turns cumulative snapshots into per-choice deltas (text, token ids, logprobs);
  `count_finish` and `usage` are the per-choice finish and the usage object both endpoints send.
- `until_disconnect` runs a non-streaming request and cancels it when the client goes away.
- `sse_events` wraps a chunk generator with keep-alive comments and the error-then-[DONE] rule;
  `SSEResponse` streams it, stops on disconnect and releases the admission ticket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from zili.outputs import CompletionOutput, Logprob, RequestOutput
from zili.serve.engine_client import EngineClient
from zili.serve.errors import APIError, envelope, to_api_error
from zili.serve.limits import Ticket
from zili.serve.sampling import Job

log = logging.getLogger("zili.serve")
_DONE = object()


async def merged_outputs(client: EngineClient, jobs: list[Job], request_id: str
                         ) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            generator = client.generate(f"{request_id}-{index}", job.prompt_token_ids, job.params, job.prompt_text)
            async with aclosing(generator) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output))
            queue.put_nowait((index, _DONE))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which maps it
            queue.put_nowait((index, error))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    remaining = len(jobs)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The OpenAI `usage` object of a response or its last stream chunk."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def count_finish(metrics, finish_reason: str | None) -> None:
    """A choice's finish: 503 when the server aborted it, else counted by reason (None: not finished)."""
    if finish_reason == "abort":
        raise APIError(503, "the request was aborted by the server", code="aborted")
    if finish_reason:
        metrics.finished.labels(reason=finish_reason).inc()


@dataclass
class ChoiceDelta:
    index: int
    """Choice index in the response: job index x n + completion index."""
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None
    finish_reason: str | None
    completion: CompletionOutput


class DeltaTracker:
    """Per choice: what was already sent. Snapshots may repeat (the process client updates one
    RequestOutput in place), so a repeated snapshot yields no delta and a finish is sent once."""

    def __init__(self, n: int):
        self.n = n
        self.sent: dict[int, tuple[int, int, int]] = {}
        self.finished: set[int] = set()

    def deltas(self, job_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        result = []
        for completion in output.outputs:
            index = job_index * self.n + completion.index
            chars, tokens, logprobs = self.sent.get(index, (0, 0, 0))
            new_logprobs = None if completion.logprobs is None else completion.logprobs[logprobs:]
            delta = ChoiceDelta(index, completion.text[chars:], completion.token_ids[tokens:], new_logprobs,
                                completion.finish_reason, completion)
            self.sent[index] = (len(completion.text), len(completion.token_ids),
                                logprobs + len(new_logprobs or []))
            if delta.finish_reason:
                if index in self.finished:
                    delta.finish_reason = None
                self.finished.add(index)
            if delta.text or delta.token_ids or delta.finish_reason:
                result.append(delta)
        return result


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work):
    """Await `work` (a coroutine); if the client disconnects first, cancel it and raise APIError(499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    result = (await asyncio.gather(task, return_exceptions=True))[0]
    if isinstance(result, Ticket):  # acquired just as the client left: nobody will use it
        result.release()
    raise APIError(499, "client closed the connection", code="client_disconnected")


def sse(data) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def sse_events(chunks: AsyncIterator[dict], keepalive_s: float) -> AsyncIterator[bytes]:
    """JSON chunks -> SSE events; a comment when idle; on failure an error event; always [DONE].

    The chunk generator runs in its own task feeding a queue, so waiting with a timeout for the
    keep-alive never cancels it mid-step.
    """
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)

    async def produce():
        try:
            async with aclosing(chunks) as items:
                async for item in items:
                    await queue.put(item)
            await queue.put(_DONE)
        except Exception as error:  # noqa: BLE001 - becomes an error event
            await queue.put(error)

    producer = asyncio.create_task(produce())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if item is _DONE:
                break
            if isinstance(item, Exception):
                error = to_api_error(item)
                if error.status >= 500:
                    log.error("stream failed: %s", type(item).__name__)
                yield sse(envelope(error))
                break
            yield sse(item)
        yield b"data: [DONE]\n\n"
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)


class SSEResponse(StreamingResponse):
    """text/event-stream that releases its admission ticket however the stream ends."""

    def __init__(self, events: AsyncIterator[bytes], ticket: Ticket | None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.ticket is not None:
                self.ticket.release()
            await self.body_iterator.aclose()


async def respond(request: Request, state, stream: bool, events, collect) -> StreamingResponse | JSONResponse:
    """Answer one OpenAI request: `events()` as SSE (admitted before the first byte) when `stream`,
    else `collect()` as JSON (admitted for the whole work); a client that leaves cancels either."""
    if stream:
        ticket = await until_disconnect(request, state.admission.acquire())
        return SSEResponse(sse_events(events(), state.settings.keepalive_s), ticket)

    async def work():
        async with state.admission.admitted():
            return await collect()

    return JSONResponse(await until_disconnect(request, work()))
