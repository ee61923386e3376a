"""What a finished or streaming request returns to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    """The top alternatives: token id -> logprob."""


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop" (EOS, stop string or stop token), "length", "abort" or None while running."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the output, if any."""
    logprobs: list[Logprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[Logprob | None] | None = None
    metrics: "RequestMetrics | None" = None
    """Timings and token counts (set by the serving engine)."""

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


@dataclass
class RequestMetrics:
    """Per-request timings (time.monotonic seconds) and token counts, filled by the engine."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    ttft_s: float | None = None
    """Time to first token: first_token_time - arrival_time."""
    tpot_s: float | None = None
    """Time per output token after the first, once finished with at least two tokens."""
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    """Tokens generated over all n completions."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
