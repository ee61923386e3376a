"""New tokens -> text, stop conditions and RequestOutput snapshots.

Stop rules, checked after each sampled token in this order (as the reference loop does):
1. a stop token (EOS unless ignore_eos, or one of stop_token_ids): finish "stop"; the token stays
   in token_ids but adds no text; stop_reason is the token id for stop_token_ids, None for EOS;
2. a stop string in the new text, also across token boundaries: finish "stop", the text ends
   before it (or after it with include_stop_str_in_output), stop_reason is the string;
3. max_tokens or max_model_len reached: finish "length".
Rules 1 and 2 apply only once min_tokens tokens exist (the sampler also masks stop tokens before
that). Released text never contains a stop string nor its possible beginning: a suffix of the
text that is a prefix of some stop string is held back until it resolves.
"""

from __future__ import annotations

import time

from zili.engine.sequence import Request, Sequence
from zili.generation import find_stop
from zili.models.tokenizer import IncrementalDetokenizer, Tokenizer
from zili.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def stop_token_ids(self, seq: Sequence) -> list[int]:
        """Tokens that end the sequence (masked by the sampler until min_tokens is reached)."""
        params = seq.params
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    def append_token(self, seq: Sequence, token_id: int, logprob: Logprob | None) -> bool:
        """Add a sampled token to the sequence; returns True when the sequence is finished."""
        params, request = seq.params, seq.request
        seq.token_ids.append(token_id)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        detok = seq.detokenizer
        num_output = seq.num_output_tokens
        may_stop = num_output >= params.min_tokens
        if may_stop and ((token_id in self.eos_token_ids and not params.ignore_eos)
                         or token_id in params.stop_token_ids):
            seq.finish_reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
            detok.flush()
            seq.text = detok.text
            return True
        previous_len = len(detok.text)
        detok.add(token_id)
        length_done = ((params.max_tokens is not None and num_output >= params.max_tokens)
                       or seq.num_tokens >= self.max_model_len)
        if length_done:
            detok.flush()
        text = detok.text
        if params.stop and may_stop:
            longest = max(len(s) for s in params.stop)
            found = find_stop(text, params.stop, previous_len - longest + 1)
            if found:
                index, stop = found
                seq.text = text[:index + len(stop) if params.include_stop_str_in_output else index]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return True
        if length_done:
            seq.text, seq.finish_reason = text, "length"
            return True
        held = partial_stop_len(text, params.stop) if params.stop else 0
        seq.text = text[:max(len(seq.text), len(text) - held)]
        return False

    def snapshot(self, request: Request) -> RequestOutput:
        """The request's cumulative output so far (fresh lists: later steps never mutate it)."""
        outputs = [CompletionOutput(index=seq.index, text=seq.text, token_ids=seq.output_token_ids,
                                    finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None)
                   for seq in request.sequences]
        prompt_logprobs = list(request.prompt_logprobs) if request.prompt_logprobs is not None else None
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             finished=request.is_finished, prompt_logprobs=prompt_logprobs,
                             metrics=request_metrics(request))


def request_metrics(request: Request) -> RequestMetrics:
    generated = [seq.num_output_tokens for seq in request.sequences]
    first, done = request.first_token_time, request.finished_time
    ttft = None if first is None else first - request.arrival_time
    tpot = None
    if first is not None and done is not None and max(generated) > 1:
        tpot = (done - first) / (max(generated) - 1)
    return RequestMetrics(arrival_time=request.arrival_time, first_token_time=first, finished_time=done,
                          ttft_s=ttft, tpot_s=tpot, num_prompt_tokens=len(request.prompt_token_ids),
                          num_generation_tokens=sum(generated),
                          num_cached_prompt_tokens=request.num_cached_prompt_tokens or 0)
