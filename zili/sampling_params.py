"""Per-request sampling parameters, validated on construction (OpenAI ranges where they exist)."""

from __future__ import annotations

from dataclasses import dataclass, field

from zili.validation import is_finite_number, require, require_each

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS_ENTRIES = 1024


def _check(ok: bool, param: str, message: str) -> None:
    """require(), with the parameter's name leading the message ("top_p: must be in (0, 1]")."""
    require(ok, param, f"{param}: {message}")


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions for the prompt; they share the prompt's KV blocks."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output ends before the first match (unless include_stop_str_in_output)."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16
    """None means up to the model's context length."""
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives."""
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}]")
        _check(is_finite_number(self.temperature) and 0 <= self.temperature <= 2, "temperature", "must be in [0, 2]")
        _check(is_finite_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be -1, 0 (disabled) or positive")
        _check(is_finite_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        require_each(self, ("presence_penalty", "frequency_penalty"),
                     lambda value: is_finite_number(value) and -2 <= value <= 2, "{name}: must be in [-2, 2]")
        _check(is_finite_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
               "repetition_penalty", "must be in (0, 2]")
        if self.logit_bias:
            _check(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias",
                   f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
            for token, bias in self.logit_bias.items():
                _check(isinstance(token, int) and token >= 0, "logit_bias", "keys must be token ids")
                _check(is_finite_number(bias) and -100 <= bias <= 100, "logit_bias", "values must be in [-100, 100]")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
               "seed", "must be an integer")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be token ids")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", "must be >= 1")
        require_each(self, ("logprobs", "prompt_logprobs"),
                     lambda value: value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                     f"{{name}}: must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a repetition, presence or frequency penalty applies (the sampler then reads the token history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
