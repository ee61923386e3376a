"""The messages between the HTTP process and the engine process: JSON lines, never pickle.

One message per line (compact JSON has no raw newlines). Outputs travel as deltas: for each
completion, the text, token ids and logprobs added since the previous message, so a long answer
costs O(length) on the pipe, not O(length^2). `OutputDecoder` rebuilds the cumulative
RequestOutput snapshots that AsyncLLMEngine.generate yields.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Any

from zili.outputs import CompletionOutput, Logprob, RequestOutput
from zili.sampling_params import SamplingParams

MAX_LINE_BYTES = 256 * 1024 * 1024


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=True).encode() + b"\n"


def decode(line: bytes) -> dict:
    return json.loads(line)


def params_to_dict(params: SamplingParams) -> dict:
    values = dataclasses.asdict(params)
    if values.get("logit_bias"):
        values["logit_bias"] = [[int(k), float(v)] for k, v in values["logit_bias"].items()]
    return values


def params_from_dict(values: dict) -> SamplingParams:
    values = dict(values)
    if values.get("logit_bias"):
        values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"]}
    return SamplingParams(**values)


def _logprob_to_list(lp: Logprob | None) -> list | None:
    if lp is None:
        return None
    return [lp.token_id, lp.logprob, [[k, v] for k, v in lp.top.items()]]


def _logprob_from_list(values: list | None) -> Logprob | None:
    if values is None:
        return None
    token_id, logprob, top = values
    return Logprob(token_id, logprob, {int(k): v for k, v in top})


def metrics_to_dict(metrics: Any) -> dict | None:
    if metrics is None:
        return None
    if dataclasses.is_dataclass(metrics):
        return dataclasses.asdict(metrics)
    return {k: v for k, v in vars(metrics).items() if isinstance(v, (int, float, str, type(None)))}


class OutputEncoder:
    """Engine side: cumulative RequestOutput snapshots -> delta messages for one request."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.sent: dict[int, tuple[int, int, int]] = {}  # index -> (chars, tokens, logprobs) sent
        self.sent_prompt_logprobs = 0

    def encode(self, output: RequestOutput) -> dict:
        choices = []
        for completion in output.outputs:
            chars, tokens, logprobs = self.sent.get(completion.index, (0, 0, 0))
            new_logprobs = completion.logprobs[logprobs:] if completion.logprobs is not None else None
            choices.append({
                "index": completion.index,
                "text": completion.text[chars:],
                "token_ids": list(completion.token_ids[tokens:]),
                "logprobs": None if new_logprobs is None else [_logprob_to_list(lp) for lp in new_logprobs],
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason,
            })
            self.sent[completion.index] = (len(completion.text), len(completion.token_ids),
                                           logprobs + len(new_logprobs or []))
        message = {"op": "output", "id": self.request_id, "choices": choices, "finished": output.finished}
        if output.prompt_logprobs is not None and len(output.prompt_logprobs) > self.sent_prompt_logprobs:
            message["prompt_logprobs"] = [_logprob_to_list(lp)
                                          for lp in output.prompt_logprobs[self.sent_prompt_logprobs:]]
            self.sent_prompt_logprobs = len(output.prompt_logprobs)
        metrics = getattr(output, "metrics", None)
        if output.finished and metrics is not None:
            message["metrics"] = metrics_to_dict(metrics)
        return message


class OutputDecoder:
    """HTTP side: delta messages -> one cumulative RequestOutput, updated in place."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]):
        self.output = RequestOutput(request_id, prompt, list(prompt_token_ids), [], finished=False)
        self.by_index: dict[int, CompletionOutput] = {}

    def apply(self, message: dict) -> RequestOutput:
        out = self.output
        for choice in message["choices"]:
            completion = self.by_index.get(choice["index"])
            if completion is None:
                completion = CompletionOutput(choice["index"], "", [],
                                              logprobs=None if choice["logprobs"] is None else [])
                self.by_index[choice["index"]] = completion
                out.outputs.append(completion)
                out.outputs.sort(key=lambda c: c.index)
            completion.text += choice["text"]
            completion.token_ids.extend(choice["token_ids"])
            if choice["logprobs"] is not None:
                if completion.logprobs is None:
                    completion.logprobs = []
                completion.logprobs.extend(_logprob_from_list(lp) for lp in choice["logprobs"])
            completion.finish_reason = choice["finish_reason"]
            completion.stop_reason = choice["stop_reason"]
        if "prompt_logprobs" in message:
            out.prompt_logprobs = (out.prompt_logprobs or []) + [_logprob_from_list(lp)
                                                                  for lp in message["prompt_logprobs"]]
        out.finished = message["finished"]
        if message.get("metrics") is not None:
            out.metrics = SimpleNamespace(**message["metrics"])
        return out
