"""Request body -> engine jobs: model check, tokenization, SamplingParams, context and compute caps.

Everything that needs the loaded model (vocab size, context length, generation defaults) is
checked here, before admission, so bad requests cost no engine time. Errors are
InvalidRequestError (-> 400, naming `param`) or APIError (404 unknown model).
"""

from __future__ import annotations

from dataclasses import dataclass

from zili.errors import InvalidRequestError
from zili.models.generation_config import GenerationDefaults
from zili.sampling_params import MAX_N, SamplingParams
from zili.serve.engine_client import ModelInfo
from zili.serve.errors import APIError
from zili.serve.protocol import SamplingFields


@dataclass
class Job:
    """One engine request: a tokenized prompt and its parameters (n completions)."""

    prompt_token_ids: list[int]
    prompt_text: str | None
    params: SamplingParams


def invalid(message: str, param: str, code: str | None = None) -> InvalidRequestError:
    error = InvalidRequestError(message, param=param)
    error.code = code
    return error


def check_model(name: str, served: list[str]) -> None:
    if name not in served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {', '.join(served)}",
                       param="model", code="model_not_found")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param)


def sampling_params(req: SamplingFields, info: ModelInfo, defaults: GenerationDefaults, *, max_tokens: int,
                    logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling fields, with the model's generation_config as defaults."""
    logit_bias = None
    if req.logit_bias:
        logit_bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        check_token_ids(list(logit_bias), info.vocab_size, "logit_bias")
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, info.vocab_size, "stop_token_ids")
    temperature = req.temperature if req.temperature is not None else (
        defaults.temperature if defaults.temperature is not None else 1.0)
    top_p = req.top_p if req.top_p is not None else (defaults.top_p if defaults.top_p is not None else 1.0)
    top_k = req.top_k if req.top_k is not None else (defaults.top_k or 0)
    if top_p == 0:  # OpenAI allows 0: the smallest set reaching probability 0 is the top token
        top_p, top_k = 1.0, 1
    repetition_penalty = req.repetition_penalty if req.repetition_penalty is not None else (
        defaults.repetition_penalty or 1.0)
    return SamplingParams(
        n=req.n, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=req.min_p if req.min_p is not None else 0.0,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=repetition_penalty, logit_bias=logit_bias, seed=req.seed, stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        min_tokens=min(req.min_tokens, max_tokens), max_tokens=max_tokens, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs)


def fit_context(prompt_lens: list[int], n: int, requested: int | None, default: int | None,
                info: ModelInfo, max_request_tokens: int, prompt_param: str, max_tokens_param: str) -> int:
    """max_tokens for every prompt of a request, or InvalidRequestError.

    An explicit max_tokens must fit beside each prompt (no silent truncation); an omitted one is
    `default` (None: the room left) clamped to the room left and to the compute cap.
    """
    if n * len(prompt_lens) > MAX_N:
        raise invalid(f"n x number of prompts is {n * len(prompt_lens)}; at most {MAX_N} completions per "
                      "request", "n")
    limit = info.max_model_len
    longest = max(prompt_lens)
    if longest >= limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, but the prompt has {longest} "
                      "tokens, leaving no room for the completion. Shorten the prompt.",
                      prompt_param, code="context_length_exceeded")
    room = limit - longest
    if requested is not None and requested > room:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, you requested "
                      f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                      "Reduce the prompt or max_tokens.", max_tokens_param, code="context_length_exceeded")
    max_tokens = requested if requested is not None else min(default or room, room)
    total_prompt = n * sum(prompt_lens)
    if total_prompt + n * len(prompt_lens) * max_tokens > max_request_tokens:
        fitting = (max_request_tokens - total_prompt) // (n * len(prompt_lens))
        if requested is not None or fitting < 1:
            raise invalid(f"this request needs up to {total_prompt + n * len(prompt_lens) * max_tokens} tokens of "
                          f"compute (n x (prompt + max_tokens)); the limit per request is {max_request_tokens}",
                          max_tokens_param if requested is not None else "n", code="request_too_large")
        max_tokens = fitting
    return max_tokens
