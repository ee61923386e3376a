"""POST /v1/chat/completions: messages through the model's chat template, streaming or not."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from zili.outputs import Logprob
from zili.serve.protocol import ChatCompletionRequest, ChatMessage
from zili.serve.sampling import Job, check_model, fit_context, invalid, sampling_params
from zili.serve.state import ServerState, finite, get_state
from zili.serve.streaming import DeltaTracker, count_finish, merged_outputs, respond, usage
from zili.serve.templates import render_chat

router = APIRouter()
ROLE_ALIASES = {"developer": "system"}


def template_messages(messages: list[ChatMessage], max_messages: int) -> list[dict]:
    if len(messages) > max_messages:
        raise invalid(f"at most {max_messages} messages per request", "messages")
    result = []
    for message in messages:
        item = {"role": ROLE_ALIASES.get(message.role, message.role), "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        result.append(item)
    return result


def _token_logprob(state: ServerState, token_id: int, logprob: float) -> dict:
    text = state.token_text(token_id)
    return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}


def _logprobs_content(state: ServerState, entries: list[Logprob]) -> list[dict]:
    content = []
    for entry in entries:
        item = _token_logprob(state, entry.token_id, entry.logprob)
        top = sorted(entry.top.items(), key=lambda kv: -kv[1])
        item["top_logprobs"] = [_token_logprob(state, t, lp) for t, lp in top]
        content.append(item)
    return content


async def _prepare(state: ServerState, body: ChatCompletionRequest) -> list[Job]:
    check_model(body.model, state.names)
    state.check_serving()
    if body.tools:
        raise invalid("tools are not supported", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise invalid("only response_format {\"type\": \"text\"} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    messages = template_messages(body.messages, state.settings.max_messages)
    text, ids = await render_chat(state.tokenizer, messages, body.add_generation_prompt,
                                  state.settings.template_timeout_s)
    if not ids:
        raise invalid("the rendered chat prompt is empty", "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = fit_context([len(ids)], body.n, requested, None, state.client.info, state.max_request_tokens,
                             "messages", param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, state.client.info, state.defaults, max_tokens=max_tokens, logprobs=logprobs)
    return [Job(ids, text, params)]


async def _collect(state: ServerState, body: ChatCompletionRequest, jobs: list[Job], request_id: str,
                   arrival: float) -> dict:
    final, first_token_s = None, None
    async for _, output in merged_outputs(state.client, jobs, request_id):
        if first_token_s is None and any(c.token_ids for c in output.outputs):
            first_token_s = time.monotonic()
        final = output
    choices, completion_tokens = [], 0
    for completion in final.outputs:
        count_finish(state.metrics, completion.finish_reason)
        completion_tokens += len(completion.token_ids)
        logprobs = {"content": _logprobs_content(state, completion.logprobs or []), "refusal": None} \
            if body.logprobs else None
        choice = {"index": completion.index,
                  "message": {"role": "assistant", "content": completion.text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": completion.finish_reason}
        if body.return_token_ids:
            choice["token_ids"] = list(completion.token_ids)
        choices.append(choice)
    state.metrics.observe_generation(arrival, first_token_s, time.monotonic(), completion_tokens)
    prompt_tokens = len(jobs[0].prompt_token_ids)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": choices, "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens)}


async def _stream(state: ServerState, body: ChatCompletionRequest, jobs: list[Job], request_id: str,
                  arrival: float):
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(choices):
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": choices, "system_fingerprint": None, **usage_field}

    # the role comes first, once per choice, as OpenAI sends it
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(body.n)])
    tracker = DeltaTracker(body.n)
    completion_tokens, first_token_s = 0, None
    async for job_index, output in merged_outputs(state.client, jobs, request_id):
        choices = []
        for delta in tracker.deltas(job_index, output):
            completion_tokens += len(delta.token_ids)
            if first_token_s is None and delta.token_ids:
                first_token_s = time.monotonic()
            if not (delta.text or delta.finish_reason or (body.logprobs and delta.logprobs) or body.return_token_ids):
                continue  # tokens whose text is held back (partial character or stop string)
            count_finish(state.metrics, delta.finish_reason)
            logprobs = {"content": _logprobs_content(state, delta.logprobs or []), "refusal": None} \
                if body.logprobs and delta.logprobs else None
            choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": logprobs, "finish_reason": delta.finish_reason}
            if body.return_token_ids:
                choice["token_ids"] = list(delta.token_ids)
            choices.append(choice)
        if choices:
            yield chunk(choices)
    state.metrics.observe_generation(arrival, first_token_s, time.monotonic(), completion_tokens)
    if include_usage:
        prompt_tokens = len(jobs[0].prompt_token_ids)
        yield {**chunk([]), "usage": usage(prompt_tokens, completion_tokens)}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    arrival = time.monotonic()
    jobs = await _prepare(state, body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return await respond(request, state, body.stream,
                         lambda: _stream(state, body, jobs, request_id, arrival),
                         lambda: _collect(state, body, jobs, request_id, arrival))
