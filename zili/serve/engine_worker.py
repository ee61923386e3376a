"""The engine process: `python -m zili.serve.engine_worker CONFIG_JSON`, started by engine_process.py.

It holds an AsyncLLMEngine and speaks JSON lines (wire.py) with the HTTP process over its
original stdin/stdout, which it moves to private descriptors first so that nothing printed by
libraries can corrupt the channel (fd 1 then points at stderr). It ignores SIGINT/SIGTERM: the
HTTP process decides when it stops (a "shutdown" message, or end of input when the parent dies).

Messages in:  generate {id, prompt_token_ids, params, prompt} | abort {id} | metrics {seq} | shutdown
Messages out: ready {info} | load_error {message} | output (wire.OutputEncoder) |
              error {id, kind: invalid_request|failed, message, param} | metrics {seq, data} | fatal {message}

Test-mode faults (config "faults", honoured only with ZILI_TEST_MODE=1), used by tests/serve:
  raise-at-token:N         a request whose prompt holds FAULT_RAISE_MARKER fails once it has N tokens
                           (a per-request failure, e.g. in detokenization: only that request fails)
  engine-raise-at-token:N  the same through engine.fault_hook with FAULT_ENGINE_MARKER: the engine
                           fails the whole batch that request is in (EngineStepError), then goes on
  crash-on-prompt          a request whose prompt holds FAULT_CRASH_MARKER kills this process
  slow-stream:SECONDS      outputs of a request whose prompt holds FAULT_SLOW_MARKER are sent one per
                           SECONDS (a slow model, for the chat page's stop button)
  hold-load:PATH           wait until PATH exists before loading the model (to observe "loading")
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
from contextlib import aclosing

from zili.errors import InvalidRequestError, ZiliError
from zili.serve import wire
from zili.serve.engine_client import metrics_dict

FAULT_RAISE_MARKER = "ZILI_FAULT_RAISE"
FAULT_ENGINE_MARKER = "ZILI_FAULT_ENGINE"
FAULT_SLOW_MARKER = "ZILI_FAULT_SLOW"
FAULT_CRASH_MARKER = "ZILI_FAULT_CRASH"
HEALTH_POLL_S = 0.5
log = logging.getLogger("zili.serve.engine")


class InjectedFault(RuntimeError):
    pass


class Faults:
    def __init__(self, specs: list[str]):
        if specs and os.environ.get("ZILI_TEST_MODE") != "1":
            raise ZiliError("fault injection is only available in test mode (ZILI_TEST_MODE=1)")
        self.raise_at_token: int | None = None
        self.engine_raise_at_token: int | None = None
        self.crash_on_prompt = False
        self.hold_load_path: str | None = None
        self.slow_stream_s: float | None = None
        self.slow: set[str] = set()
        self.marked: set[str] = set()
        self.engine_marked: set[str] = set()
        for spec in specs:
            name, _, arg = spec.partition(":")
            if name == "raise-at-token":
                self.raise_at_token = int(arg)
            elif name == "engine-raise-at-token":
                self.engine_raise_at_token = int(arg)
            elif name == "crash-on-prompt":
                self.crash_on_prompt = True
            elif name == "slow-stream":
                self.slow_stream_s = float(arg)
            elif name == "hold-load":
                self.hold_load_path = arg
            else:
                raise ZiliError(f"unknown fault {spec!r}")

    async def hold_load(self) -> None:
        while self.hold_load_path and not os.path.exists(self.hold_load_path):
            await asyncio.sleep(0.05)

    def on_request(self, request_id: str, prompt: str | None) -> None:
        if self.crash_on_prompt and prompt and FAULT_CRASH_MARKER in prompt:
            os._exit(70)
        if self.raise_at_token is not None and prompt and FAULT_RAISE_MARKER in prompt:
            self.marked.add(request_id)
        if self.engine_raise_at_token is not None and prompt and FAULT_ENGINE_MARKER in prompt:
            self.engine_marked.add(request_id)
        if self.slow_stream_s is not None and prompt and FAULT_SLOW_MARKER in prompt:
            self.slow.add(request_id)

    async def delay(self, request_id: str) -> None:
        if request_id in self.slow:
            await asyncio.sleep(self.slow_stream_s)

    def check_output(self, request_id: str, output) -> None:
        if request_id in self.marked and any(len(c.token_ids) >= self.raise_at_token for c in output.outputs):
            raise InjectedFault("injected fault")

    def engine_hook(self, seq) -> None:
        """engine.fault_hook: called per scheduled sequence before the model runs."""
        if seq.request.request_id in self.engine_marked and seq.num_output_tokens >= self.engine_raise_at_token:
            raise InjectedFault("injected engine fault")

    def forget(self, request_id: str) -> None:
        self.marked.discard(request_id)
        self.engine_marked.discard(request_id)
        self.slow.discard(request_id)


class Worker:
    def __init__(self, config: dict, writer: asyncio.StreamWriter):
        self.config = config
        self.writer = writer
        self.faults = Faults(config.get("faults") or [])
        self.tasks: dict[str, asyncio.Task] = {}
        self.engine = None
        self.pending: list[bytes] = []

    def send(self, message: dict) -> None:
        """Queue a message; everything queued in one turn of the event loop (a step's outputs for all
        its requests) goes out in one write, so the HTTP process wakes once per step."""
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(wire.encode(message))

    def flush(self) -> None:
        if self.pending:
            self.writer.write(b"".join(self.pending))
            self.pending.clear()

    async def drain(self) -> None:
        """Write out what is queued and wait until the pipe took it (before exiting)."""
        self.flush()
        await self.writer.drain()

    def load(self) -> bool:
        from zili.engine.async_engine import AsyncLLMEngine

        options = {k: v for k, v in (self.config.get("engine_options") or {}).items() if v is not None}
        try:
            self.engine = AsyncLLMEngine.from_folder(self.config["model"], device=self.config.get("device"),
                                                     dtype=self.config.get("dtype"), progress=True, **options)
        except (ZiliError, ValueError, OSError) as e:
            self.send({"op": "load_error", "message": str(e)})
            return False
        except Exception as e:  # noqa: BLE001 - report, don't dump a traceback into the server log
            self.send({"op": "load_error", "message": f"the model failed to load ({type(e).__name__})"})
            return False
        inner = self.engine.engine
        log.info("%s", inner.plan.describe())
        # Everything alive now (the model, torch, transformers' modules: ~300k objects) lives as long as
        # this process. Out of the collector's reach, a full collection no longer walks it: one took
        # ~100 ms with the benchmark model loaded, a stall of every stream's next token.
        gc.collect()
        gc.freeze()
        if self.faults.engine_raise_at_token is not None:
            inner.fault_hook = self.faults.engine_hook
        self.send({"op": "ready", "info": {"max_model_len": int(inner.max_model_len),
                                           "vocab_size": int(inner.model_config.vocab_size),
                                           "eos_token_ids": [int(t) for t in inner.eos_token_ids]}})
        return True

    async def run_request(self, message: dict) -> None:
        request_id = message["id"]
        encoder = wire.OutputEncoder(request_id)
        try:
            params = wire.params_from_dict(message["params"])
            self.faults.on_request(request_id, message.get("prompt"))
            outputs = self.engine.generate(request_id, message["prompt_token_ids"], params,
                                           prompt=message.get("prompt"))
            async with aclosing(outputs):  # leaving early (abort, failure) aborts it in the engine
                async for output in outputs:
                    self.faults.check_output(request_id, output)
                    await self.faults.delay(request_id)
                    self.send(encoder.encode(output))
        except asyncio.CancelledError:
            pass  # aborted by the HTTP side
        except InvalidRequestError as e:
            self.send({"op": "error", "id": request_id, "kind": "invalid_request", "message": str(e),
                       "param": e.param, "code": getattr(e, "code", None)})
        except Exception as e:  # noqa: BLE001 - this request fails alone
            log.error("request failed in the engine: %s", type(e).__name__)
            self.send({"op": "error", "id": request_id, "kind": "failed",
                       "message": "the engine failed this request", "param": None})
        finally:
            self.tasks.pop(request_id, None)
            self.faults.forget(request_id)

    def handle(self, message: dict) -> bool:
        """Act on one message; False means stop."""
        op = message.get("op")
        if op == "generate":
            self.tasks[message["id"]] = asyncio.create_task(self.run_request(message))
        elif op == "abort":
            task = self.tasks.pop(message["id"], None)
            if task is not None:
                task.cancel()
            self.engine.abort(message["id"])
        elif op == "metrics":
            self.send({"op": "metrics", "seq": message["seq"], "data": metrics_dict(self.engine.metrics())})
        elif op == "shutdown":
            return False
        return True

    async def watch_health(self) -> None:
        while self.engine.is_healthy():
            await asyncio.sleep(HEALTH_POLL_S)
        self.send({"op": "fatal", "message": "the engine loop stopped"})
        await self.drain()
        os._exit(1)

    async def serve(self, reader: asyncio.StreamReader) -> int:
        await self.faults.hold_load()
        if not self.load():
            await self.drain()
            return 1
        watchdog = asyncio.create_task(self.watch_health())
        while True:
            line = await reader.readline()
            if not line or not self.handle(wire.decode(line)):
                break  # shutdown asked, or the HTTP process is gone
        watchdog.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.engine.shutdown()
        await self.drain()
        return 0


async def _main(config: dict, in_fd: int, out_fd: int) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=wire.MAX_LINE_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", 0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(out_fd, "wb", 0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        worker = Worker(config, writer)
    except ZiliError as e:
        writer.write(wire.encode({"op": "load_error", "message": str(e)}))
        await writer.drain()
        return 1
    return await worker.serve(reader)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the channel
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(config, in_fd, out_fd))


if __name__ == "__main__":
    sys.exit(main())
