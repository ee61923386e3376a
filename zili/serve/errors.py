"""One error envelope for every non-2xx response, framework errors included.

Body: {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}. Messages
never carry tracebacks, exception text from unexpected failures, or request content.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from zili.errors import InvalidRequestError, TokenizerError
from zili.serve.engine_client import EngineDeadError, EngineNotReadyError, RequestFailedError

log = logging.getLogger("zili.serve")

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
    500: "internal_error", 503: "service_unavailable_error",
}


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in request handling."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                                        else "internal_error")


def envelope(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param,
                      "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(envelope(error), status_code=error.status, headers=error.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map an exception from request handling to the error a client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        code = getattr(exc, "code", None)
        return APIError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, TokenizerError):
        return APIError(400, str(exc), param="messages", code="template_error")
    if isinstance(exc, (EngineDeadError, EngineNotReadyError)):
        code = "engine_dead" if isinstance(exc, EngineDeadError) else "model_loading"
        return APIError(503, str(exc), code=code, headers={"Retry-After": "1"})
    if isinstance(exc, RequestFailedError):
        log.error("a request failed in the engine")
        return APIError(500, "the engine failed this request", code="internal_error")
    log.error("internal error while handling a request: %s", type(exc).__name__)
    return APIError(500, "internal server error", code="internal_error")


def _loc_to_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not any(ch in str(part) for ch in "[]()"):  # skip pydantic's union-branch tags like "list[int]"
            text += f".{part}" if text else str(part)
    return text or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type") or kind.startswith("json"):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    param = _loc_to_param(tuple(first.get("loc", ())))
    detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        if kind != "value_error":
            detail = "the request body must be a JSON object with the documented fields"
        return APIError(400, detail, code="invalid_body")
    message = f"{param}: {detail}"
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        messages = {404: "no such route", 405: "method not allowed on this route"}
        message = messages.get(exc.status_code, "request failed")
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError):
        return error_response(to_api_error(exc))

    @app.exception_handler(TokenizerError)
    async def _tokenizer(request: Request, exc: TokenizerError):
        return error_response(to_api_error(exc))


class CatchAllMiddleware:
    """Turns any unhandled exception into a 500 envelope; logs its type only (no text, no traceback)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            error = to_api_error(exc)
            if not started:
                await error_response(error)(scope, receive, send)
