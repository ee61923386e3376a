"""Small routes: health, readiness, models, metrics, tokenize / detokenize, and the chat page."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from zili.serve.errors import APIError
from zili.serve.openai_chat import template_messages
from zili.serve.protocol import DetokenizeRequest, TokenizeRequest
from zili.serve.sampling import check_model, check_token_ids, invalid
from zili.serve.state import get_state
from zili.serve.templates import render_chat

router = APIRouter()
WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STARTED = time.time()


@router.get("/health")
async def health():
    """Liveness: the HTTP process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """Readiness: 503 while loading, draining, or when the engine is dead."""
    state = get_state(request)
    state.check_serving()
    return {"status": "ready"}


@router.get("/v1/models")
async def list_models(request: Request):
    state = get_state(request)
    info = state.client.info
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": int(STARTED), "owned_by": "zili",
         "max_model_len": info.max_model_len if info else None} for name in state.names]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = get_state(request)
    check_model(model_id, state.names)
    return {"id": model_id, "object": "model", "created": int(STARTED), "owned_by": "zili"}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    state = get_state(request)
    snapshot = {}
    if state.client.is_healthy():
        try:
            snapshot = await state.client.metrics()
        except Exception:  # noqa: BLE001 - the HTTP metrics are still worth serving
            snapshot = {}
    return Response(state.metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
@router.post("/v1/tokenize", include_in_schema=False)
async def tokenize(body: TokenizeRequest, request: Request):
    state = get_state(request)
    if body.model is not None:
        check_model(body.model, state.names)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        messages = template_messages(body.messages, state.settings.max_messages)
        _, ids = await render_chat(state.tokenizer, messages, body.add_generation_prompt,
                                   state.settings.template_timeout_s)
    else:
        ids = await asyncio.to_thread(state.tokenizer.encode, body.prompt, body.add_special_tokens)
    info = state.client.info
    return {"tokens": ids, "count": len(ids), "max_model_len": info.max_model_len if info else None}


@router.post("/detokenize")
@router.post("/v1/detokenize", include_in_schema=False)
async def detokenize(body: DetokenizeRequest, request: Request):
    state = get_state(request)
    if body.model is not None:
        check_model(body.model, state.names)
    vocab = state.client.info.vocab_size if state.client.info else state.tokenizer.vocab_size
    check_token_ids(body.tokens, vocab, "tokens")
    return {"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)}


@router.get("/", response_class=HTMLResponse)
async def page():
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str):
    if name not in STATIC_FILES:
        raise APIError(404, "no such file", code="route_not_found")
    return FileResponse(WEB_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return Response(status_code=204)
