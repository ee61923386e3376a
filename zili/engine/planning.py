"""Resolve an EngineConfig against a loaded model: KV cache size, context length, step budget.

The one place engine defaults become numbers:
- blocks: `num_blocks` if given, else the memory budget (`kv_cache_memory`, or
  `kv_cache_memory_fraction` of the device's free memory) divided by the bytes of one block across
  all layers (int8 payload + scales with kv_cache_dtype="int8"); the fractional default is capped at what `max_num_seqs` full-length sequences use;
- max_model_len: the requested value (never above max_position_embeddings), or the model's
  maximum lowered to what the KV cache holds; an explicit value the cache cannot hold is an error;
- max_num_batched_tokens: 512 with chunked prefill, else max_model_len.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from zili.config import ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from zili.devices import free_memory_bytes
from zili.engine.paged_attention import PagedKVCache

DEFAULT_CHUNKED_PREFILL_TOKENS = 512


@dataclass
class EnginePlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    kv_cache_dtype: str
    """"auto" (the compute dtype) or "int8"."""
    max_model_len: int
    scheduler: SchedulerConfig
    """With max_model_len and max_num_batched_tokens resolved."""

    @property
    def num_kv_tokens(self) -> int:
        """Tokens the KV cache holds, over all sequences."""
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        """One line for startup logs: KV capacity, storage and size."""
        size_mib = self.num_blocks * self.bytes_per_block / 2**20
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} = {self.num_kv_tokens} tokens, "
                f"kv_cache_dtype={self.kv_cache_dtype}, {size_mib:.1f} MiB; max_model_len={self.max_model_len}")


def plan_engine(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                device: torch.device) -> EnginePlan:
    cache, sched = config.cache, config.scheduler
    model_max = model_config.max_position_embeddings
    if sched.max_model_len is not None and sched.max_model_len > model_max:
        raise ConfigError(f"max_model_len={sched.max_model_len} exceeds the model's max_position_embeddings "
                          f"({model_max})")
    wanted_len = sched.max_model_len or model_max
    block_size = cache.block_size
    per_block = PagedKVCache.bytes_per_block(model_config.num_hidden_layers, block_size,
                                            model_config.num_key_value_heads, model_config.head_dim, dtype,
                                            cache.kv_cache_dtype)
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    elif cache.kv_cache_memory is not None:
        num_blocks = cache.kv_cache_memory // per_block
    else:
        budget = int(free_memory_bytes(str(device)) * cache.kv_cache_memory_fraction)
        useful = sched.max_num_seqs * -(-wanted_len // block_size)
        num_blocks = min(budget // per_block, useful)
    if num_blocks < 1:
        raise ConfigError(f"the KV cache budget holds no block of {per_block} bytes; raise kv_cache_memory")
    capacity = num_blocks * block_size
    if sched.max_model_len is not None and capacity < sched.max_model_len:
        raise ConfigError(f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {block_size}), fewer than "
                          f"max_model_len={sched.max_model_len}; raise kv_cache_memory or lower max_model_len")
    max_model_len = min(wanted_len, capacity)
    batched = sched.max_num_batched_tokens
    if batched is None:
        batched = DEFAULT_CHUNKED_PREFILL_TOKENS if sched.enable_chunked_prefill else max_model_len
    elif not sched.enable_chunked_prefill and batched < max_model_len:
        raise ConfigError(f"without chunked prefill max_num_batched_tokens ({batched}) must be >= max_model_len "
                          f"({max_model_len})")
    resolved = replace(sched, max_model_len=max_model_len, max_num_batched_tokens=batched)
    return EnginePlan(num_blocks, block_size, per_block, cache.kv_cache_dtype, max_model_len, resolved)
