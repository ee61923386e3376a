"""Start a server (zili serve or llama-server), wait until it is ready, load it, measure, stop it.

The load runs in its own process (benchmarks/load_client.py) so the client's event loop does not
share the server's interpreter; the server's peak RSS is sampled over its whole process tree
(zili serve runs the engine in a child process) while the load runs.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from common import LOG_DIR, REPO_DIR, log, run_child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssMonitor:
    """Samples the summed RSS of a process tree every `interval_s`; `.peak_bytes` is the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s, self.peak_bytes = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_ready(base_url: str, paths: tuple[str, ...], process: subprocess.Popen, timeout_s: float) -> None:
    """Poll until the first of `paths` the server serves answers 200 (zili: /ready; llama-server: /health)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        for path in paths:  # the first path the server knows decides (404: try the next one)
            try:
                status = httpx.get(base_url + path, timeout=5).status_code
            except httpx.HTTPError:
                break
            if status == 200:
                return
            if status != 404:
                break
        time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def measure_server(name: str, command: list[str], port: int, ready_paths: tuple[str, ...], model_name: str,
                   streams: int, max_tokens: int, reps: int, seed: int = 0, ready_timeout_s: float = 600,
                   load_timeout_s: float = 3600, env: dict | None = None) -> dict:
    """Start the server, run `reps` load rounds (benchmarks/load_client.py), stop it. The result
    keeps every round's requests ("rounds") so rounds of several server runs can be pooled."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    log(f"starting {name}: {' '.join(command)}")
    with open(LOG_DIR / f"server-{name}.log", "w") as server_log:
        process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO_DIR,
                                   start_new_session=True, env={**os.environ, **(env or {})})
        try:
            started = time.perf_counter()
            wait_ready(base_url, ready_paths, process, ready_timeout_s)
            ready_s = time.perf_counter() - started
            with RssMonitor(process.pid) as rss:
                result = run_child("load_client.py", ["--base-url", base_url, "--model", model_name,
                                                      "--streams", str(streams), "--max-tokens", str(max_tokens),
                                                      "--reps", str(reps), "--seed", str(seed),
                                                      "--keep-requests"],
                                   f"load-{name}", timeout_s=load_timeout_s)
            result.update(server=name, ready_s=ready_s, peak_rss_bytes=rss.peak_bytes)
            return result
        finally:
            stop(process)


def zili_serve_command(model: Path, port: int, streams: int, threads: int) -> list[str]:
    """`zili serve` with the flags its --help offers (the CLI may still be growing)."""
    base = [sys.executable, "-m", "zili.cli", "serve"]
    help_text = subprocess.run([*base, "--help"], capture_output=True, text=True, cwd=REPO_DIR).stdout
    command = [*base, str(model), "--port", str(port)]
    optional = {"--dtype": "bfloat16", "--max-num-seqs": str(streams), "--threads": str(threads),
                "--host": "127.0.0.1"}
    for flag, value in optional.items():
        if flag in help_text:
            command += [flag, value]
    if "--no-access-log" in help_text:
        command.append("--no-access-log")
    return command


def llama_server_command(binary: str, gguf: Path, port: int, streams: int, threads: int,
                         context_per_stream: int) -> list[str]:
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(streams), "-c", str(streams * context_per_stream), "-cb"]
