"""Request bodies of the OpenAI-compatible API (pydantic, strict: "1.0" is not a number).

Ranges follow the OpenAI spec (docs/RELIABILITY.md item 3); pydantic reports violations with
their field path, which the error handler turns into a 400 naming `param`. Checks that need the
model (vocab, context length) happen in sampling.py. Unknown fields are ignored, as clients send
newer OpenAI fields; fields we cannot honour (tools, suffix, best_of != n) are refused there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zili.sampling_params import MAX_LOGPROBS, MAX_N

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_COMPLETION_LOGPROBS = 5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TEXT_PROMPTS = 16


def _check_unicode(value: Any) -> None:
    """JSON may carry lone surrogates ("\\ud800"); they cannot be tokenized or sent back as UTF-8."""
    if isinstance(value, str):
        value.encode("utf-8")  # UnicodeEncodeError is a ValueError: pydantic reports it
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Body(_Strict):
    """A whole request body: strings in it must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        try:
            _check_unicode(data)
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (no lone surrogates)") from None
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # zili extensions (vLLM names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP * 4)
    return_token_ids: bool = False
    """Add each choice's generated token ids ("token_ids"; deltas when streaming)."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 12:
                raise ValueError("keys must be token ids")
            if not -100 <= bias <= 100:
                raise ValueError("values must be in [-100, 100]")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(t < 0 for t in value):
            raise ValueError("must be token ids")
        return value


class CompletionRequest(SamplingFields):
    prompt: Any
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str] | list[list[int]]:
        """Normalized to a list of strings or a list of token-id lists, none empty."""
        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str):
            value = [value]
        elif is_ids(value) and value:
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty string, list of strings, list of token ids or list of lists")
        if not (all(isinstance(p, str) for p in value) or all(is_ids(p) for p in value)):
            raise ValueError("must be a string, list of strings, list of token ids or list of lists")
        if len(value) > MAX_TEXT_PROMPTS:
            raise ValueError(f"at most {MAX_TEXT_PROMPTS} prompts per request")
        if any(len(p) == 0 for p in value):
            raise ValueError("prompts must not be empty")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every non-2xx response body."""

    error: ErrorBody
