"""Run the app under uvicorn: startup lines, graceful SIGTERM drain, exit codes.

- Binds first, then loads: /health answers at once and /ready turns 200 when the model is in.
- SIGTERM / SIGINT: /ready turns 503, new requests get 503, the listening socket closes,
  in-flight requests get `drain_timeout_s` to finish, then the engine process is stopped.
  Exit code 0. A second SIGINT forces the exit.
- The engine dying, or failing to load, stops the server with exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from contextlib import contextmanager

import uvicorn

from zili.sampling_params import MAX_N
from zili.serve.app import Hooks, create_app
from zili.serve.engine_client import InProcessEngineClient
from zili.serve.engine_process import ProcessEngineClient
from zili.serve.security import LOOPBACK_NAMES
from zili.serve.settings import ServeSettings

log = logging.getLogger("zili.serve")
H11_MAX_HEADER_BYTES = 64 * 1024  # a larger header block is refused by the parser (plain 400)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.zili_state = state
        self.exit_code = 0
        self.url = ""

    def handle_exit(self, sig, frame) -> None:
        self.zili_state.draining = True
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self):
        # uvicorn re-raises a caught SIGTERM after shutdown, which would end the process with
        # status 143; a drained shutdown is a clean exit, so the handlers are restored only.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{port}"
            print(f"zili: listening on {self.url} (loading the model...)", flush=True)

    def fatal(self, message: str) -> None:
        print(f"zili: error: {message}", file=sys.stderr, flush=True)
        self.exit_code = 1
        self.should_exit = True


def build_client(settings: ServeSettings):
    # the engine counts sequences: any valid n (up to MAX_N) must fit one request's batch
    options = {"max_num_seqs": max(settings.max_num_seqs, MAX_N), "kv_cache_memory": settings.kv_cache_memory,
               "max_model_len": settings.max_model_len, "max_num_batched_tokens": settings.max_num_batched_tokens,
               "enable_prefix_caching": settings.enable_prefix_caching, "kv_cache_dtype": settings.kv_cache_dtype,
               "num_scheduler_steps": settings.num_scheduler_steps}
    options = {k: v for k, v in options.items() if v is not None}
    if settings.in_process:
        def load():
            from zili.engine.async_engine import AsyncLLMEngine
            return AsyncLLMEngine.from_folder(settings.model, device=settings.device, dtype=settings.dtype, **options)
        return InProcessEngineClient(loader=load)
    return ProcessEngineClient(settings.model, device=settings.device, dtype=settings.dtype,
                               engine_options=options, faults=settings.fault_injection)


def run_server(settings: ServeSettings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host not in LOOPBACK_NAMES and settings.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or ZILI_API_KEY)", settings.host)
    client = build_client(settings)
    hooks = Hooks()
    app = create_app(settings, client, hooks=hooks)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, http="h11", ws="none", lifespan="on",
                            h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s), timeout_keep_alive=5,
                            access_log=settings.access_log, log_config=None, server_header=False)
    server = DrainingServer(config, app.state.zili)

    def on_ready() -> None:
        names = ", ".join(settings.model_names)
        print(f"zili: ready, serving {names}\n  chat page: {server.url}/\n  API:       {server.url}/v1 "
              "(OpenAI-compatible)", flush=True)

    hooks.on_ready = on_ready
    hooks.on_fatal = server.fatal
    asyncio.run(server.serve())
    return server.exit_code
