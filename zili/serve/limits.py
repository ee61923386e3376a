"""Size limits before buffering, and bounded admission of generation requests.

BodyLimitMiddleware reads at most `max_body_bytes` of a request body (after gzip/deflate
decoding) before the application sees it: an announced or actual larger body is answered 413
at once, without reading the rest. Too many headers get 431. (uvicorn's h11 parser already
refuses a header block above its incomplete-event limit, see server.py.)

AdmissionController admits at most `max_running` requests at once plus `max_queued` waiting;
any more are refused at once with 503 + Retry-After, and a request queued for longer than
`queue_timeout_s` gets 503 too.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zili.serve.errors import APIError, error_response

RETRY_AFTER_S = 1


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_headers: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_headers = max_headers

    async def _reject(self, scope, receive, send, error: APIError) -> None:
        error.headers.setdefault("Connection", "close")
        await error_response(error)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            await self._reject(scope, receive, send, APIError(431, f"too many headers (limit {self.max_headers})",
                                                              code="headers_too_large"))
            return
        too_large = APIError(413, f"request body too large (limit {self.max_body_bytes} bytes)",
                             code="request_too_large")
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._reject(scope, receive, send, too_large if length.isdigit() else
                               APIError(400, "malformed Content-Length", code="invalid_header"))
            return
        encoding = next((v for k, v in headers if k == b"content-encoding"), b"identity").strip().lower()
        if encoding not in (b"identity", b"gzip", b"deflate", b""):
            await self._reject(scope, receive, send, APIError(415, "unsupported Content-Encoding "
                                                              "(use identity, gzip or deflate)",
                                                              code="unsupported_encoding"))
            return
        # gzip: wbits 16+15; deflate: zlib stream (auto-detect header with 32+15)
        decoder = None if encoding in (b"identity", b"") else zlib.decompressobj(
            16 + zlib.MAX_WBITS if encoding == b"gzip" else 32 + zlib.MAX_WBITS)
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if decoder is not None:
                try:
                    # max_length bounds the output of this call; leftover input waits in unconsumed_tail
                    chunk = decoder.decompress(decoder.unconsumed_tail + chunk, self.max_body_bytes + 1 - len(body))
                    if decoder.unconsumed_tail:
                        await self._reject(scope, receive, send, too_large)
                        return
                    room = self.max_body_bytes + 1 - len(body) - len(chunk)
                    if not more and room > 0:
                        chunk += decoder.flush(room)
                except zlib.error:
                    await self._reject(scope, receive, send, APIError(400, "request body is not valid "
                                                                      f"{encoding.decode()} data",
                                                                      code="invalid_encoding"))
                    return
            body += chunk
            if len(body) > self.max_body_bytes:
                await self._reject(scope, receive, send, too_large)
                return
        if decoder is not None:
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]
            scope["headers"].append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)


class AdmissionController:
    """At most max_running admitted requests run; max_queued more wait (FIFO) up to queue_timeout_s.

    Check and count happen without an await in between, so a burst cannot overshoot the bounds.
    A released slot passes straight to the oldest waiter.
    """

    def __init__(self, max_running: int, max_queued: int, queue_timeout_s: float):
        self.max_running = max_running
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.num_running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    def _busy(self, message: str) -> APIError:
        return APIError(503, message, code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def acquire(self) -> "Ticket":
        """A running slot; raises APIError(503) when full or after the queue timeout."""
        if self.num_running < self.max_running and not self._waiters:
            self.num_running += 1
            return Ticket(self)
        if len(self._waiters) >= self.max_queued:
            raise self._busy("the server is at capacity; retry later")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        # not asyncio.wait_for: on 3.11 it can swallow a cancellation that races with the slot
        # being handed over, and the slot would leak
        timer = loop.call_later(self.queue_timeout_s,
                                lambda: waiter.done() or waiter.set_exception(asyncio.TimeoutError()))
        try:
            await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # the slot arrived as we gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(error, asyncio.TimeoutError):
                raise self._busy("the request waited too long in the queue; retry later") from None
            raise
        finally:
            timer.cancel()
        return Ticket(self)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; num_running stays
                return
        self.num_running -= 1

    @asynccontextmanager
    async def admitted(self):
        ticket = await self.acquire()
        try:
            yield ticket
        finally:
            ticket.release()


class Ticket:
    """A running slot; release() is idempotent so streaming responses can hand it over safely."""

    def __init__(self, controller: AdmissionController):
        self._controller = controller
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._controller._release()
