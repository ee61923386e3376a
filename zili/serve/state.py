"""ServerState: what the routes share (settings, engine client, tokenizer, admission, metrics)."""

from __future__ import annotations

import functools
import math

from fastapi import Request

from zili.models.generation_config import GenerationDefaults
from zili.models.tokenizer import Tokenizer
from zili.serve.engine_client import EngineClient
from zili.serve.errors import APIError
from zili.serve.limits import RETRY_AFTER_S, AdmissionController
from zili.serve.metrics import ServerMetrics
from zili.serve.settings import ServeSettings

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI clients expect a number


class ServerState:
    def __init__(self, settings: ServeSettings, client: EngineClient, tokenizer: Tokenizer,
                 defaults: GenerationDefaults):
        self.settings = settings
        self.client = client
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.admission = AdmissionController(settings.max_num_seqs, settings.max_queue, settings.queue_timeout_s)
        self.metrics = ServerMetrics()
        self.metrics.engine.admission = self.admission
        self.draining = False
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)

    @property
    def names(self) -> list[str]:
        return self.settings.model_names

    @property
    def max_request_tokens(self) -> int:
        return self.settings.max_request_tokens or 4 * self.client.info.max_model_len

    def _busy(self, message: str, code: str) -> APIError:
        return APIError(503, message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_serving(self) -> None:
        """503 unless the engine is ready and the server is not draining."""
        if self.draining:
            raise self._busy("the server is shutting down", "shutting_down")
        if self.client.dead:
            raise self._busy("the engine has stopped", "engine_dead")
        if not self.client.ready:
            raise self._busy("the model is still loading", "model_loading")

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def get_state(request: Request) -> ServerState:
    return request.app.state.zili


def finite(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else MIN_LOGPROB
