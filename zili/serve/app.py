"""create_app: the FastAPI application, its middleware stack and its lifespan.

Middleware, outermost first (each a pure ASGI class, so streams are not buffered):
  RequestCounter -> OriginHost -> [CORS, only with an allowlist] -> APIKey -> BodyLimit -> CatchAll -> routes
The lifespan starts the engine in the background (the server answers /health and a 503 /ready
while the model loads) and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from zili.errors import ZiliError
from zili.models.generation_config import GenerationDefaults
from zili.models.tokenizer import Tokenizer
from zili.serve import openai_chat, openai_completions, routes
from zili.serve.engine_client import EngineClient
from zili.serve.errors import CatchAllMiddleware, install_error_handlers
from zili.serve.limits import BodyLimitMiddleware
from zili.serve.metrics import RequestCounterMiddleware
from zili.serve.protocol import ErrorEnvelope
from zili.serve.security import LOOPBACK_NAMES, APIKeyMiddleware, OriginHostMiddleware
from zili.serve.settings import ServeSettings
from zili.serve.state import ServerState

log = logging.getLogger("zili.serve")


@dataclass
class Hooks:
    """How the app tells its runner about the engine (server.py prints and exits on these)."""

    on_ready: Callable[[], None] = lambda: None
    on_fatal: Callable[[str], None] = lambda message: None


ERROR_STATUSES = {"400": "Invalid request (validation, context length, template)", "401": "Missing or bad API key",
                  "403": "Origin not allowed", "404": "Unknown route or model", "405": "Method not allowed",
                  "413": "Body too large", "415": "Unsupported Content-Encoding", "431": "Too many headers",
                  "500": "Internal error", "503": "Loading, at capacity or shutting down (see Retry-After)"}
STREAMING_PATHS = ("/v1/completions", "/v1/chat/completions")


def _openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, corrected: errors are 400 (never 422) in the one envelope, and the
    generation routes also answer text/event-stream."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs"))
        schemas["ErrorEnvelope"] = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas["ErrorEnvelope"].pop("$defs", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in ERROR_STATUSES.items():
                    responses[status] = {"description": description, **error}
                if path in STREAMING_PATHS:
                    responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
        app.openapi_schema = document
    return app.openapi_schema


def _allowed_hosts(settings: ServeSettings) -> list[str] | None:
    if settings.allowed_hosts is not None:
        return settings.allowed_hosts or None
    return list(LOOPBACK_NAMES) if settings.host in LOOPBACK_NAMES else None


def create_app(settings: ServeSettings, client: EngineClient, tokenizer: Tokenizer | None = None,
               hooks: Hooks | None = None) -> FastAPI:
    hooks = hooks or Hooks()
    tokenizer = tokenizer or Tokenizer.from_folder(settings.model)
    state = ServerState(settings, client, tokenizer, GenerationDefaults.from_folder(settings.model))
    client.on_dead = lambda: hooks.on_fatal("the engine process stopped")

    async def start_engine() -> None:
        try:
            await client.start()
        except ZiliError as e:
            hooks.on_fatal(f"the model could not be loaded: {e}")
            return
        hooks.on_ready()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            state.draining = True
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await client.shutdown()

    app = FastAPI(title="zili", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API of a zili server")
    app.state.zili = state
    app.openapi = lambda: _openapi_document(app)
    install_error_handlers(app)
    for module in (openai_completions, openai_chat, routes):
        app.include_router(module.router)
    # add_middleware prepends: the last added is the outermost
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, max_headers=settings.max_headers)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                           max_age=600)
    app.add_middleware(OriginHostMiddleware, allowed_hosts=_allowed_hosts(settings),
                       allowed_origins=settings.allowed_origins)
    app.add_middleware(RequestCounterMiddleware, metrics=state.metrics)
    return app
