"""Continuous batching: which sequence computes how many tokens this step. No tensors.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest
first, each asking for all its uncomputed tokens (1 for a decode, the rest of the prompt for a
prefill in progress), cut to the remaining budget when chunked prefill is on. When the KV cache
cannot hold a sequence's new tokens, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the waiting queue, to be recomputed later (its prefix is
often still cached). Waiting sequences are admitted in arrival order while budget, blocks and
`max_num_seqs` allow, reusing cached prefix blocks; none are admitted in a step that preempted.

The output is a list of `ScheduledChunk`s; `update` then advances the computed counts once the
model ran, registers full blocks in the prefix cache and forks n > 1 completions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from zili.config import SchedulerConfig
from zili.engine.block_manager import BlockManager
from zili.engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    """First position computed (the sequence's num_computed_tokens when scheduled)."""
    num_tokens: int
    samples: bool
    """The chunk reaches the sequence's last token, so its logits are sampled."""


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def request_ids(self) -> list[str]:
        return list(dict.fromkeys(chunk.seq.request.request_id for chunk in self.chunks))


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if config.max_num_batched_tokens is None:
            raise ValueError("the scheduler needs a resolved max_num_batched_tokens")
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queues ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.params.n > self.config.max_num_seqs:
            raise ValueError(f"n={request.params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        self.waiting.extend(request.queued_sequences)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Waiting sequences, including completions waiting for their prompt to be shared."""
        pending = sum(len(seq.pending_forks) for seq in (*self.waiting, *self.running))
        return len(self.waiting) + pending

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _seats_taken(self) -> int:
        return len(self.running) + sum(len(seq.pending_forks) for seq in self.running)

    # ---- one step -------------------------------------------------------------------------

    def _tokens_to_compute(self, seq: Sequence, computed: int) -> int:
        end = seq.fork_at if seq.pending_forks and computed < seq.fork_at else seq.num_tokens
        return end - computed

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            wanted = self._tokens_to_compute(seq, seq.num_computed_tokens)
            num_tokens = min(wanted, budget)
            if num_tokens == 0 or (num_tokens < wanted and not chunked):
                index += 1
                continue
            while not self.block_manager.allocate(seq, num_tokens):
                victim = self.running.pop()  # newest first; never one already scheduled
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            out.chunks.append(self._chunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
            index += 1
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            if self._seats_taken() + 1 + len(seq.pending_forks) > self.config.max_num_seqs:
                break
            cached = [] if seq.params.prompt_logprobs is not None else self.block_manager.match_prefix(seq.token_ids)
            start = len(cached) * self.block_manager.block_size
            wanted = self._tokens_to_compute(seq, start)
            num_tokens = min(wanted, budget)
            if (num_tokens < wanted and not chunked) or not self.block_manager.allocate(seq, num_tokens, cached):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.request.num_cached_prompt_tokens is None:
                seq.request.num_cached_prompt_tokens = start
            out.chunks.append(self._chunk(seq, start, num_tokens))
            budget -= num_tokens
            if seq.pending_forks and seq.num_computed_tokens >= seq.fork_at:
                self._fork(seq)  # the shared prompt was fully cached
        return out

    @staticmethod
    def _chunk(seq: Sequence, start: int, num_tokens: int) -> ScheduledChunk:
        return ScheduledChunk(seq, start, num_tokens, samples=start + num_tokens == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _fork(self, leader: Sequence) -> None:
        at = self.running.index(leader) + 1
        for child in leader.pending_forks:
            self.block_manager.fork(leader, child, leader.fork_at)
            child.status = SequenceStatus.RUNNING
        self.running[at:at] = leader.pending_forks
        leader.pending_forks = []

    def update(self, out: SchedulerOutput) -> None:
        """The model computed `out`: advance computed counts, cache full blocks, fork n > 1."""
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.block_manager.commit(seq)
            if seq.pending_forks and seq.num_computed_tokens >= seq.fork_at:
                self._fork(seq)

    # ---- leaving --------------------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        """Take the sequence out of the queues and free its blocks (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        for child in seq.pending_forks:  # forks never started: they end with the leader
            child.status = SequenceStatus.FINISHED
        seq.pending_forks = []
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
