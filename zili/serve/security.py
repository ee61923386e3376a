"""Who may talk to the server: Host and Origin checks, and the API key.

- Host: when bound to loopback, only loopback Host names are accepted (stops DNS rebinding
  from a web page); configurable with --allowed-host.
- Origin: a browser request from another origin is refused (403) unless that origin is in the
  CORS allowlist; same-origin requests (the chat page) pass. CORS headers themselves come from
  Starlette's CORSMiddleware, added only when an allowlist exists, without credentials.
- API key: with a key configured every route except PUBLIC_PATHS needs it, as
  `Authorization: Bearer <key>` (or HTTP Basic with the key as password, so a browser can open
  the chat page). Compared in constant time; never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from zili.serve.errors import APIError, error_response

PUBLIC_PATHS = frozenset({"/health", "/ready"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class OriginHostMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None, allowed_origins: list[str]):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.allowed_origins = set(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host") or ""
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            await error_response(APIError(400, "Host header not allowed", code="invalid_host"))(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is not None and origin not in self.allowed_origins:
            same_origin = urlsplit(origin).netloc.lower() == host.lower() and host != ""
            if not same_origin:
                await error_response(APIError(403, "cross-origin requests are not allowed from this origin",
                                              code="origin_not_allowed"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def key_matches(header: str | None, api_key: str) -> bool:
    """Constant-time check of a Bearer token or a Basic password against the key."""
    expected = api_key.encode()
    supplied = b""
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            supplied = value.strip().encode()
        elif scheme.lower() == "basic":
            try:
                supplied = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                supplied = b""
    return hmac.compare_digest(supplied, expected)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if not key_matches(_header(scope, b"authorization"), self.api_key):
            headers = {"WWW-Authenticate": 'Bearer realm="zili"'}
            if not scope["path"].startswith("/v1/"):  # the page: let the browser ask for the key
                headers["WWW-Authenticate"] = 'Basic realm="zili (any user name, the API key as password)"'
            await error_response(APIError(401, "missing or invalid API key", code="invalid_api_key",
                                          headers=headers))(scope, receive, send)
            return
        await self.app(scope, receive, send)
