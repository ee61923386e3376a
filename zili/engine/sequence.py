"""Request and Sequence state, shared by the scheduler, block manager and output processor.

A `Request` is what a caller submitted (one prompt, its SamplingParams); it owns `n` `Sequence`s,
one per completion. A sequence's tokens are `prompt + output`; `num_computed_tokens` of them have
their KV in the cache. The scheduler moves sequences between WAITING and RUNNING and asks the model
to compute the next `num_tokens - num_computed_tokens` (or a chunk of them).

n > 1 shares the prompt: only the first sequence (the leader) is queued; the others wait in
`leader.pending_forks` until the leader has computed `fork_at` prompt tokens (whole blocks), then
they adopt those blocks and compute only their own tail. Nothing here touches tensors.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from zili.outputs import Logprob
from zili.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion: its tokens, its place in the KV cache, and its output so far."""

    def __init__(self, request: "Request", index: int, token_ids: list[int]):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        """Completion index within the request (CompletionOutput.index; seed offset)."""
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        """KV block ids holding this sequence's tokens, in order."""
        self.block_content_ids: list[int] = []
        """Prefix-cache content id of each full, computed block (block manager's bookkeeping)."""
        self.pending_forks: list[Sequence] = []
        self.fork_at = 0
        """Tokens the leader computes before `pending_forks` adopt its blocks (a block multiple)."""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""
        """Output text released to the caller (never contains a possibly partial stop string)."""
        self.logprobs: list[Logprob] = []
        self.detokenizer: Any = None
        """The output processor's incremental detokenizer."""

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def seed(self) -> int | None:
        """Per-completion seed: request seed + completion index (None: unseeded)."""
        seed = self.params.seed
        return None if seed is None else seed + self.index

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


@dataclass
class Request:
    """A submitted prompt with its sampling parameters and the sequences generating for it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    """Filled chunk by chunk when params.prompt_logprobs is set; entry 0 is None."""
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int | None = None
    """Prompt tokens found in the prefix cache at first admission (None until admitted)."""

    @classmethod
    def create(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               prompt: str | None = None, block_size: int = 16) -> "Request":
        request = cls(request_id, list(prompt_token_ids), params, prompt)
        request.sequences = [Sequence(request, i, prompt_token_ids) for i in range(params.n)]
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        leader = request.sequences[0]
        # Every sequence must compute at least one token of its own to get logits: share whole
        # blocks strictly before the last prompt token.
        leader.fork_at = (len(prompt_token_ids) - 1) // block_size * block_size
        if params.n > 1 and leader.fork_at > 0:
            leader.pending_forks = request.sequences[1:]
        return request

    @property
    def queued_sequences(self) -> list[Sequence]:
        """The sequences that enter the scheduler's waiting queue (forks come later)."""
        leader = self.sequences[0]
        return [leader] if leader.pending_forks else list(self.sequences)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)
