"""ServeSettings: every knob of `zili serve`, with its default in exactly one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class ServeSettings:
    model: Path
    """Model folder (Hugging Face layout)."""
    host: str = "127.0.0.1"
    """Bind address; loopback by default so nothing is exposed without asking."""
    port: int = 8000
    """0 picks a free port (printed on the startup line)."""
    served_model_names: list[str] = field(default_factory=list)
    """Names clients use in `model`; default: the folder's name."""
    api_key: str | None = None
    """If set, every route but /health and /ready needs `Authorization: Bearer <key>`."""
    allowed_origins: list[str] = field(default_factory=list)
    """CORS allowlist (exact origins); empty means no CORS headers at all."""
    allowed_hosts: list[str] | None = None
    """Accepted Host header names; None: loopback names when bound to loopback, else any."""
    device: str | None = None
    dtype: str | None = None
    max_num_seqs: int = 16
    """Requests the engine runs at once (also the HTTP admission's running slots)."""
    max_queue: int = 64
    """Admitted requests waiting for a running slot; beyond that: 503 + Retry-After."""
    queue_timeout_s: float = 60.0
    """A request still queued after this long gets 503."""
    kv_cache_memory: str | None = None
    """KV cache size ("4GiB" or bytes); None lets the engine decide."""
    kv_cache_dtype: str = "auto"
    """KV cache storage: "auto" (the compute dtype) or "int8" (~2x the tokens per byte of bf16)."""
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    num_scheduler_steps: int = 1
    """Greedy decode steps per engine step (SchedulerConfig.num_scheduler_steps)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Request bodies above this (after decompression) get 413."""
    max_headers: int = 100
    max_request_tokens: int | None = None
    """Cap on sum over choices of (prompt + max_tokens); None: 4 x max_model_len."""
    max_messages: int = 1024
    keepalive_s: float = 10.0
    """SSE comment sent after this long without a token."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, in-flight requests get this long to finish before they are cancelled."""
    template_timeout_s: float = 2.0
    """Chat template rendering time limit."""
    in_process: bool = False
    """Run the engine inside the HTTP process (debugging); default: its own child process."""
    fault_injection: list[str] = field(default_factory=list)
    """Test-mode faults (honoured only with ZILI_TEST_MODE=1); see engine_worker.py."""
    access_log: bool = True
    """uvicorn's access log: client address, method, path, status (never bodies or headers)."""

    @property
    def model_names(self) -> list[str]:
        return self.served_model_names or [self.model.name]
