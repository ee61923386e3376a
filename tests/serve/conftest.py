"""Server fixtures: real `zili serve` processes on free loopback ports with a tiny random model.

- `serve_model` (session): a tiny random-weight Llama folder (tests/tiny_models.py).
- `server` (session): one shared server (`--max-model-len 128`, two served names, the
  raise-at-token fault armed for prompts carrying FAULT_RAISE_MARKER). Most tests use it.
- `start_server(*args, model=..., env=...)`: a dedicated server for tests that need another
  configuration; stopped at the end of the test (or module, for module-scoped wrappers).

Servers run with ZILI_TEST_MODE=1 so the hidden --fault-injection flag is honoured, and in
fp32: the random model's near-tied logits would flip under bf16's batch-dependent rounding.
Their stdout/stderr go to files so tests can read the logs.

docs/RELIABILITY.md, item -> test module:
  1, 2, 4, 21 test_errors   3 test_sampling_property   5, 23 test_openai_client, test_openapi
  6 test_limits   7 test_admission   8 test_soak   9 test_disconnect   10, 11 test_faults
  12 test_kv_pressure   13 test_determinism   14 test_shutdown   15 test_lifecycle   16 test_utf8
  17, 18 test_security   19 test_weights   20 test_templates   22 test_logs (and test_errors)
  the chat page: test_web_page
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120
LISTEN_RE = re.compile(r"zili: listening on (http://\S+)")
MODEL_NAME = "tiny"
ALIAS_NAME = "tiny-alias"
SHARED_MAX_MODEL_LEN = 128


class ServerProcess:
    """A `zili serve` child process; `url` once listening, `wait_ready()` once the model is loaded."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None):
        self.log_path = log_dir / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w+")
        full_env = {**os.environ, "ZILI_TEST_MODE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "zili.cli", "serve", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=full_env)
        self.lines: queue.Queue = queue.Queue()
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for(LISTEN_RE).group(1)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for(self, pattern: re.Pattern):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"server did not print {pattern.pattern!r}; log:\n{self.logs()}") from None
            if line is None:
                raise RuntimeError(f"server exited ({self.proc.wait()}) before {pattern.pattern!r}; log:\n"
                                   f"{self.logs()}")
            match = pattern.search(line)
            if match:
                return match

    def wait_ready(self) -> "ServerProcess":
        self._wait_for(re.compile(r"zili: ready"))
        return self

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text() + "".join(self.stdout_lines)

    def engine_pid(self) -> int:
        import psutil

        children = psutil.Process(self.proc.pid).children()
        return next(c.pid for c in children if "engine_worker" in " ".join(c.cmdline()))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def serve_model(checkpoint_factory) -> Path:
    return checkpoint_factory("LlamaForCausalLM")


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def _server_starter(log_dir: Path):
    """The body of the `start_server*` fixtures: yields `start(*args, model=..., env=..., ready=...)`
    and stops every server it started when the fixture's scope ends."""
    started: list[ServerProcess] = []

    def start(*args: str, model: Path, env: dict | None = None, ready: bool = True) -> ServerProcess:
        proc = ServerProcess([str(model), "--port", "0", "--dtype", "float32", *args], log_dir, env)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def start_server_session(server_logs):
    """Session-scoped: servers started here are stopped at the end of the session."""
    yield from _server_starter(server_logs)


@pytest.fixture
def start_server(server_logs):
    """Function-scoped: servers started here are stopped when the test ends."""
    yield from _server_starter(server_logs)


@pytest.fixture(scope="session")
def server(start_server_session, serve_model) -> ServerProcess:
    return start_server_session("--max-model-len", str(SHARED_MAX_MODEL_LEN), "--served-model-name", MODEL_NAME,
                                "--served-model-name", ALIAS_NAME, "--max-num-seqs", "8",
                                "--fault-injection", "raise-at-token:3", "--fault-injection", "engine-raise-at-token:2",
                                "--fault-injection", "slow-stream:0.05",
                                model=serve_model)


@pytest.fixture
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def engine_metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """Scrape /metrics into {name: value} for unlabelled samples."""
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=30).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for_metrics(url: str, condition, timeout_s: float = 20.0, headers: dict | None = None) -> dict:
    """Scrape /metrics until `condition(values)` holds (work in flight settles); fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = engine_metrics(url, headers)
        if condition(values):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never settled: {values}")
        time.sleep(0.05)


def complete(http_client: httpx.Client, **body) -> httpx.Response:
    return http_client.post("/v1/completions", json={"model": MODEL_NAME, **body})
