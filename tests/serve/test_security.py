"""API key, Host/Origin checks, CORS, network defaults, no pickle (RELIABILITY items 17, 18).

The route list comes from the app itself, so a route added later is covered automatically.
"""

from __future__ import annotations

import ast
import base64
import inspect
import re
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL_NAME
from fake_engine import SlowFakeEngine

import zili.serve
from zili.cli import build_parser
from zili.serve.app import create_app
from zili.serve.security import PUBLIC_PATHS, key_matches
from zili.serve.settings import ServeSettings

API_KEY = "sekret-KEY-0123456789"
ALLOWED_ORIGIN = "http://allowed.example"
EVIL_ORIGIN = "http://evil.example"
PATH_PARAMS = {"model_id": MODEL_NAME, "name": "app.js"}


@pytest.fixture(scope="module")
def secured(start_server_session, serve_model):
    return start_server_session("--api-key", API_KEY, "--allowed-origin", ALLOWED_ORIGIN, "--served-model-name",
                                MODEL_NAME, model=serve_model)


def _flatten(routes):
    """Routes of the app, descending into included routers (FastAPI may keep them nested)."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            yield from _flatten(nested.routes)
        elif getattr(route, "methods", None):
            yield route


def app_routes(model: Path) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves."""
    app = create_app(ServeSettings(model=model), SlowFakeEngine(vocab_size=100))
    result = []
    for route in _flatten(app.routes):
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_PARAMS[m.group(1)], route.path)
        for method in sorted(route.methods - {"HEAD"}):
            result.append((method, path))
    return result


def test_every_route_but_health_checks_needs_the_key(secured, serve_model):
    routes = app_routes(serve_model)
    assert {p for _, p in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/",
                                      "/tokenize", "/detokenize", "/openapi.json", "/health", "/ready"}
    with httpx.Client(base_url=secured.url, timeout=30) as client:
        for method, path in routes:
            body = {"json": {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}} if method == "POST" else {}
            anonymous = client.request(method, path, **body)
            wrong = client.request(method, path, headers={"Authorization": "Bearer wrong"}, **body)
            right = client.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"}, **body)
            if path in PUBLIC_PATHS:
                assert anonymous.status_code == 200, path
                continue
            for response in (anonymous, wrong):
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert "www-authenticate" in response.headers
            assert right.status_code != 401, (method, path)
        assert client.get("/nope").status_code == 401  # unknown routes are no way around the key


def test_basic_auth_with_the_key_as_password_opens_the_page(secured):
    token = base64.b64encode(f"anyone:{API_KEY}".encode()).decode()
    page = httpx.get(secured.url + "/", headers={"Authorization": f"Basic {token}"})
    assert page.status_code == 200 and "<title>zili chat</title>" in page.text
    challenge = httpx.get(secured.url + "/")
    assert challenge.status_code == 401 and challenge.headers["www-authenticate"].startswith("Basic")


def test_openai_client_with_and_without_the_key(secured):
    good = openai.OpenAI(base_url=secured.base_url, api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=secured.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_comparison_is_constant_time_and_exact():
    assert "hmac.compare_digest" in inspect.getsource(key_matches)
    assert key_matches(f"Bearer {API_KEY}", API_KEY)
    assert not key_matches(f"Bearer {API_KEY}x", API_KEY)
    assert not key_matches(f"Bearer {API_KEY[:-1]}", API_KEY)
    assert not key_matches(None, API_KEY) and not key_matches("Basic !!!", API_KEY)


def test_the_key_is_never_logged(secured):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    httpx.post(secured.base_url + "/completions", headers=headers, json={"model": MODEL_NAME, "prompt": "hi"})
    httpx.get(secured.base_url + "/models", headers={"Authorization": f"Bearer {API_KEY}-wrong"})
    httpx.get(secured.url + "/metrics", headers=headers)
    assert API_KEY not in secured.logs()


def test_cors_is_off_by_default_and_foreign_origins_are_refused(server):
    evil = httpx.post(server.base_url + "/completions", headers={"Origin": EVIL_ORIGIN},
                      json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in evil.headers
    preflight = httpx.options(server.base_url + "/completions", headers={
        "Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    same_origin = httpx.get(server.base_url + "/models", headers={"Origin": server.url})
    assert same_origin.status_code == 200 and "access-control-allow-origin" not in same_origin.headers


def test_cors_allowlist_without_credentials(secured):
    headers = {"Origin": ALLOWED_ORIGIN, "Authorization": f"Bearer {API_KEY}"}
    allowed = httpx.get(secured.base_url + "/models", headers=headers)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert allowed.headers.get("access-control-allow-credentials") != "true"
    preflight = httpx.options(secured.base_url + "/chat/completions", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    evil = httpx.get(secured.base_url + "/models", headers={**headers, "Origin": EVIL_ORIGIN})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers


def test_host_header_is_checked_on_loopback(server):
    port = server.url.rsplit(":", 1)[1]
    assert httpx.get(server.url + "/health", headers={"Host": "evil.example"}).status_code == 400
    assert httpx.get(server.url + "/health", headers={"Host": f"evil.example:{port}"}).json()["error"]["code"] \
        == "invalid_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200


def test_loopback_is_the_default_bind(server):
    args = build_parser(["serve"]).parse_args(["serve"])
    assert args.host == "127.0.0.1" and ServeSettings(model=Path(".")).host == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")


PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib",
                    "multiprocessing", "copyreg"}


def test_no_pickle_in_server_code():
    """No serving module imports a pickling module (multiprocessing pipes pickle) or calls torch.load."""
    source_dir = Path(zili.serve.__file__).parent
    offenders = []
    for path in source_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] in PICKLING_MODULES for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", "") == "torch":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
    # the engine process is a fresh interpreter talking JSON lines, not a multiprocessing child
    assert "create_subprocess_exec" in (source_dir / "engine_process.py").read_text()
