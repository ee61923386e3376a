"""Engine configuration: memory sizes, validation, and how the plan turns options into numbers."""

from __future__ import annotations

import pytest
import torch

from zili.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig, parse_memory_size
from zili.engine import planning
from zili.engine.planning import plan_engine

MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=1024)
# one block of 16 tokens: 2 layers * (k, v) * 2 heads * 16 tokens * 16 dims * 4 bytes
BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4


def plan(**options):
    return plan_engine(EngineConfig.from_options(**options), MODEL, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("text,expected", [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5 gib", 3 * 2**29),
                                           (4096, 4096), ("100", 100), ("2k", 2000)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "4 GiBs", "0", True])
def test_parse_memory_size_rejects_nonsense(bad):
    with pytest.raises(ConfigError):
        parse_memory_size(bad)


def test_configs_validate_on_construction():
    with pytest.raises(ConfigError):
        CacheConfig(block_size=0)
    with pytest.raises(ConfigError):
        CacheConfig(kv_cache_memory_fraction=1.5)
    with pytest.raises(ConfigError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ConfigError):
        SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=200)
    with pytest.raises(ConfigError, match="unknown engine option 'blocksize'"):
        EngineConfig.from_options(blocksize=16)


def test_memory_budget_sets_the_number_of_blocks():
    result = plan(kv_cache_memory=100 * BLOCK_BYTES + 5)
    assert result.bytes_per_block == BLOCK_BYTES and result.num_blocks == 100
    assert result.max_model_len == 1024 and result.scheduler.max_num_batched_tokens == 512


def test_default_budget_is_a_fraction_of_free_memory_capped_at_what_is_useful(monkeypatch):
    monkeypatch.setattr(planning, "free_memory_bytes", lambda device: 1000 * BLOCK_BYTES)
    assert plan(kv_cache_memory_fraction=0.5).num_blocks == 500
    # 2 sequences of 1024 tokens never need more than 128 blocks
    assert plan(kv_cache_memory_fraction=0.5, max_num_seqs=2).num_blocks == 128


def test_context_length_follows_the_cache_unless_set_explicitly():
    assert plan(num_blocks=10).max_model_len == 160  # the model's 1024 would not fit
    assert plan(num_blocks=10, max_model_len=100).max_model_len == 100
    with pytest.raises(ConfigError, match="holds 160 tokens"):
        plan(num_blocks=10, max_model_len=200)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        plan(max_model_len=2048, num_blocks=1000)


def test_without_chunked_prefill_the_step_budget_covers_a_whole_prompt():
    assert plan(num_blocks=100, enable_chunked_prefill=False).scheduler.max_num_batched_tokens == 1024
    with pytest.raises(ConfigError):
        plan(num_blocks=100, enable_chunked_prefill=False, max_num_batched_tokens=64)
