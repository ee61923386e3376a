"""Engine-wide counters, snapshotted as a plain dataclass (the server exports them to Prometheus)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineMetrics:
    num_running: int
    """Sequences in the running batch (a request with n > 1 counts n)."""
    num_waiting: int
    """Sequences waiting for admission (new, preempted, or n > 1 completions waiting for their prompt)."""
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    kv_block_size: int
    prefix_cache_queries: int
    """Tokens looked up in the prefix cache (prompts, and recomputations after preemption)."""
    prefix_cache_hits: int
    """Of those, tokens whose KV was found cached."""
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_total: int
    """Prompt tokens of all requests accepted so far."""
    generation_tokens_total: int
    """Tokens sampled so far, over all completions."""
    num_requests_finished: int
    num_requests_aborted: int

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
