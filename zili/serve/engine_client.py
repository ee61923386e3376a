"""What the HTTP layer needs from an engine, and the in-process implementation.

`EngineClient` is the narrow interface the routes use: generate (cumulative RequestOutput
snapshots, the AsyncLLMEngine contract), abort, metrics, health. Two implementations:
- ProcessEngineClient (engine_process.py): the engine in a child process; what `zili serve` runs.
- InProcessEngineClient (here): an AsyncLLMEngine in this process; for debugging
  (`--in-process`) and for tests that substitute a fake engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from zili.errors import ZiliError
from zili.outputs import RequestOutput
from zili.sampling_params import SamplingParams


class EngineDeadError(ZiliError):
    """The engine stopped; no request can be served any more."""


class EngineNotReadyError(ZiliError):
    """The engine is still loading."""


class RequestFailedError(ZiliError):
    """The engine failed this one request; others are unaffected."""


@dataclass
class ModelInfo:
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)


METRIC_NAMES = ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "prefix_cache_hit_rate",
                "num_preemptions", "prompt_tokens_total", "generation_tokens_total", "num_requests_finished",
                "num_requests_aborted")


def metrics_dict(metrics) -> dict:
    """EngineMetrics (any object with the documented attributes) -> plain dict of numbers."""
    return {name: float(getattr(metrics, name, 0) or 0) for name in METRIC_NAMES}


class EngineClient:
    """Base class: state flags and the dead-engine callback; subclasses do the work."""

    def __init__(self):
        self.info: ModelInfo | None = None
        self.ready = False
        self.dead = False
        self.on_dead: Callable[[], None] | None = None

    async def start(self) -> None:
        """Load the model; returns when ready. Raises ZiliError if loading fails."""
        raise NotImplementedError

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def metrics(self) -> dict:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    def is_healthy(self) -> bool:
        return self.ready and not self.dead

    def check_available(self) -> None:
        if self.dead:
            raise EngineDeadError("the engine has stopped")
        if not self.ready:
            raise EngineNotReadyError("the model is still loading")

    def _mark_dead(self) -> None:
        if not self.dead:
            self.dead = True
            if self.on_dead is not None:
                self.on_dead()


class InProcessEngineClient(EngineClient):
    """Wraps an AsyncLLMEngine (or anything with its interface) living in this process."""

    def __init__(self, async_engine=None, loader: Callable[[], object] | None = None):
        super().__init__()
        self.engine = async_engine
        self._loader = loader

    async def start(self) -> None:
        if self.engine is None:
            self.engine = await asyncio.to_thread(self._loader)
        inner = self.engine.engine
        self.info = ModelInfo(max_model_len=inner.max_model_len, vocab_size=inner.model_config.vocab_size,
                              eos_token_ids=list(inner.eos_token_ids))
        self.ready = True

    async def generate(self, request_id, prompt_token_ids, params, prompt=None):
        self.check_available()
        try:
            async for output in self.engine.generate(request_id, prompt_token_ids, params, prompt=prompt):
                yield output
        except (ZiliError, ValueError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:  # noqa: BLE001 - one request's failure, reported without its text
            if not self.engine.is_healthy():
                self._mark_dead()
                raise EngineDeadError("the engine has stopped") from None
            raise RequestFailedError("the engine failed this request") from None

    def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)

    async def metrics(self) -> dict:
        return metrics_dict(self.engine.metrics())

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()

    def is_healthy(self) -> bool:
        return super().is_healthy() and self.engine.is_healthy()
