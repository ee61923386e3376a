"""Size limits before full buffering (RELIABILITY item 6).

A 50 MiB body (announced or chunked), a gzip bomb and 10,000 headers are refused without the
server reading or inflating them into memory: its RSS grows by less than 20 MiB, and it keeps
serving. Raw sockets are used so the client can stop sending as soon as the server answers.
"""

from __future__ import annotations

import gzip
import json
import socket
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import MODEL_NAME

MIB = 1024 * 1024
BODY = json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}).encode()


def raw_request(url: str, head: str, chunks) -> tuple[int, bytes]:
    """Send a request head and body chunks until the server answers; return (status, response bytes)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(head.encode("latin-1"))
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        response = b""
        try:
            while b"\r\n\r\n" not in response or len(response) < 12:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
            sock.settimeout(2)
            while True:  # the rest of a small body, if any
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, socket.timeout):
            pass
    return int(response.split(b" ", 2)[1]), response


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def head(path: str, headers: dict[str, str]) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def envelope_code(response: bytes) -> str | None:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"]


def fifty_mib_in_chunks(chunk_size: int = MIB):
    for _ in range(50):
        yield b" " * chunk_size


@pytest.fixture
def rss_guard(server):
    before = _rss(server.proc.pid)
    yield
    assert _rss(server.proc.pid) - before < 20 * MIB


def test_announced_huge_body_is_413_at_once(server, rss_guard):
    status, response = raw_request(server.url, head("/v1/completions", {"Content-Length": str(50 * MIB)}),
                                   fifty_mib_in_chunks())
    assert status == 413 and envelope_code(response) == "request_too_large"


def test_chunked_huge_body_is_413(server, rss_guard):
    def chunked():
        for chunk in fifty_mib_in_chunks():
            yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        yield b"0\r\n\r\n"

    status, response = raw_request(server.url, head("/v1/completions", {"Transfer-Encoding": "chunked"}), chunked())
    assert status == 413 and envelope_code(response) == "request_too_large"


def test_gzip_bomb_is_413_after_bounded_inflation(server, rss_guard):
    bomb = gzip.compress(b"[" + b" " * (200 * MIB) + b"]", compresslevel=9)
    assert len(bomb) < 1 * MIB
    status, response = raw_request(server.url, head("/v1/completions", {
        "Content-Length": str(len(bomb)), "Content-Encoding": "gzip"}), [bomb])
    assert status == 413 and envelope_code(response) == "request_too_large"


def test_gzip_body_within_limits_is_served(server):
    body = gzip.compress(BODY)
    status, response = raw_request(server.url, head("/v1/completions", {
        "Content-Length": str(len(body)), "Content-Encoding": "gzip", "Connection": "close"}), [body])
    assert status == 200 and b'"finish_reason"' in response


def test_corrupt_gzip_is_400(server):
    status, response = raw_request(server.url, head("/v1/completions", {
        "Content-Length": "10", "Content-Encoding": "gzip"}), [b"not gzip!!"])
    assert status == 400 and envelope_code(response) == "invalid_encoding"


def test_ten_thousand_headers_are_refused(server, rss_guard):
    many = {f"X-Filler-{i}": "v" for i in range(10_000)}
    status, _ = raw_request(server.url, head("/v1/completions", {"Content-Length": str(len(BODY)), **many}), [BODY])
    assert status in (400, 431)  # above 64 KiB the HTTP parser itself refuses the header block


def test_too_many_headers_get_431_envelope(server):
    many = {f"X-Filler-{i}": "v" for i in range(150)}
    status, response = raw_request(server.url, head("/v1/completions", {"Content-Length": str(len(BODY)), **many}),
                                   [BODY])
    assert status == 431 and envelope_code(response) == "headers_too_large"


def test_server_still_serves_after_the_attacks(http):
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
