"""POST /v1/completions: text or token-id prompts, n, echo, logprobs, stop, seed, stream."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from zili.outputs import Logprob
from zili.serve.protocol import CompletionRequest
from zili.serve.sampling import Job, check_model, check_token_ids, fit_context, invalid, sampling_params
from zili.serve.state import ServerState, finite, get_state
from zili.serve.streaming import DeltaTracker, count_finish, merged_outputs, respond, usage

router = APIRouter()


def _logprobs_block(state: ServerState, entries: list[Logprob], start_offset: int) -> dict:
    """OpenAI completions logprobs: parallel lists of tokens, logprobs, top dicts and text offsets."""
    block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for entry in entries:
        text = state.token_text(entry.token_id)
        block["tokens"].append(text)
        block["token_logprobs"].append(finite(entry.logprob))
        block["top_logprobs"].append(None if entry.logprob is None else
                                     {state.token_text(t): finite(lp) for t, lp in entry.top.items()})
        block["text_offset"].append(offset)
        offset += len(text)
    return block


def _prompt_entries(output, prompt_token_ids: list[int]) -> list[Logprob]:
    """Echoed prompt logprobs; the first prompt token has none (null, as OpenAI sends it)."""
    return [lp if lp is not None else Logprob(prompt_token_ids[i], None)
            for i, lp in enumerate(output.prompt_logprobs or [])]


async def _prepare(state: ServerState, body: CompletionRequest) -> list[Job]:
    check_model(body.model, state.names)
    state.check_serving()
    if body.suffix:
        raise invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of must equal n (candidates are not ranked)", "best_of")
    info = state.client.info
    if isinstance(body.prompt[0], str):
        texts = body.prompt
        prompts = await asyncio.to_thread(lambda: [state.tokenizer.encode(p) for p in texts])
    else:
        texts, prompts = [None] * len(body.prompt), body.prompt
        for ids in prompts:
            check_token_ids(ids, info.vocab_size, "prompt")
    explicit = body.max_tokens if "max_tokens" in body.model_fields_set else None
    max_tokens = fit_context([len(p) for p in prompts], body.n, explicit, body.max_tokens or 16, info,
                             state.max_request_tokens, "prompt", "max_tokens")
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = sampling_params(body, info, state.defaults, max_tokens=max_tokens, logprobs=body.logprobs,
                             prompt_logprobs=prompt_logprobs)
    return [Job(ids, text, params) for ids, text in zip(prompts, texts)]


def _echo_text(state: ServerState, job: Job) -> str:
    return job.prompt_text if job.prompt_text is not None else state.tokenizer.decode(job.prompt_token_ids)


async def _collect(state: ServerState, body: CompletionRequest, jobs: list[Job], request_id: str,
                   arrival: float) -> dict:
    finals: dict[int, object] = {}
    first_token_s = None
    async for job_index, output in merged_outputs(state.client, jobs, request_id):
        if first_token_s is None and any(c.token_ids for c in output.outputs):
            first_token_s = time.monotonic()
        if output.finished:
            finals[job_index] = output
    choices, completion_tokens = [], 0
    for job_index, job in enumerate(jobs):
        output = finals[job_index]
        for completion in output.outputs:
            count_finish(state.metrics, completion.finish_reason)
            completion_tokens += len(completion.token_ids)
            prefix = _echo_text(state, job) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                entries = (_prompt_entries(output, job.prompt_token_ids) if body.echo else []) + \
                    list(completion.logprobs or [])
                logprobs = _logprobs_block(state, entries, 0)
            choice = {"index": job_index * body.n + completion.index, "text": prefix + completion.text,
                      "logprobs": logprobs, "finish_reason": completion.finish_reason}
            if body.return_token_ids:
                choice["token_ids"] = list(completion.token_ids)
            choices.append(choice)
    state.metrics.observe_generation(arrival, first_token_s, time.monotonic(), completion_tokens)
    prompt_tokens = sum(len(job.prompt_token_ids) for job in jobs)
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "choices": choices, "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens)}


async def _stream(state: ServerState, body: CompletionRequest, jobs: list[Job], request_id: str, arrival: float):
    created = int(time.time())
    tracker = DeltaTracker(body.n)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_chunk = {"usage": None} if include_usage else {}
    echoed: set[int] = set()
    offsets: dict[int, int] = {}  # choice index -> characters sent (logprobs text_offset)
    completion_tokens, first_token_s = 0, None

    def chunk(choices):
        return {"id": request_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "system_fingerprint": None, **usage_chunk}

    async for job_index, output in merged_outputs(state.client, jobs, request_id):
        choices = []
        for delta in tracker.deltas(job_index, output):
            completion_tokens += len(delta.token_ids)
            if first_token_s is None and delta.token_ids:
                first_token_s = time.monotonic()
            if not (delta.text or delta.finish_reason or body.logprobs is not None or body.return_token_ids or
                    (body.echo and delta.index not in echoed)):
                continue  # tokens whose text is held back (partial character or stop string)
            count_finish(state.metrics, delta.finish_reason)
            text, logprob_entries = delta.text, list(delta.logprobs or [])
            if body.echo and delta.index not in echoed:
                echoed.add(delta.index)
                text = _echo_text(state, jobs[job_index]) + text
                logprob_entries = _prompt_entries(output, jobs[job_index].prompt_token_ids) + logprob_entries
            logprobs = None
            if body.logprobs is not None:
                logprobs = _logprobs_block(state, logprob_entries, offsets.get(delta.index, 0))
            offsets[delta.index] = offsets.get(delta.index, 0) + len(text)
            choice = {"index": delta.index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
            if body.return_token_ids:
                choice["token_ids"] = list(delta.token_ids)
            choices.append(choice)
        if choices:
            yield chunk(choices)
    state.metrics.observe_generation(arrival, first_token_s, time.monotonic(), completion_tokens)
    if include_usage:
        prompt_tokens = sum(len(job.prompt_token_ids) for job in jobs)
        yield {**chunk([]), "usage": usage(prompt_tokens, completion_tokens)}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    arrival = time.monotonic()
    jobs = await _prepare(state, body)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    return await respond(request, state, body.stream,
                         lambda: _stream(state, body, jobs, request_id, arrival),
                         lambda: _collect(state, body, jobs, request_id, arrival))
