"""Paged attention equals the dense SDPA oracle: decode, prefill after a cached prefix, chunks,
sliding windows, grouped-query heads, mixed batches, scattered blocks."""

from __future__ import annotations

import random

import pytest
import torch

from zili.engine.paged_attention import AttentionMetadata, PagedAttention, PagedKVCache
from zili.layers.attention import causal_mask, sdpa_attention


def run_batch(specs, num_heads, num_kv_heads, window, dtype=torch.float32, block_size=4, head_dim=16, seed=0,
              device="cpu"):
    """specs: (cached tokens, new tokens) per sequence. Returns max |paged - oracle| per sequence."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_layers, num_blocks = 2, 96
    cache = PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    cache.kv[:, :, :, :cache.pad_slot] = float("nan")  # unwritten slots must never be read
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, non-contiguous block tables
    order = sorted(range(len(specs)), key=lambda i: specs[i][1] != 1)  # the runner's order: decodes first
    specs = [specs[i] for i in order]
    tables, keys, values = [], [], []
    for cached, new in specs:
        tables.append([free.pop() for _ in range(-(-(cached + new) // block_size))])
        keys.append(torch.randn(num_layers, cached + new, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(num_layers, cached + new, num_kv_heads, head_dim, generator=gen).to(dtype))
    for (cached, _), table, k, v in zip(specs, tables, keys, values):
        for p in range(cached):
            slot = table[p // block_size] * block_size + p % block_size
            cache.kv[:, 0, :, slot], cache.kv[:, 1, :, slot] = k[:, p].to(device), v[:, p].to(device)
    metadata = AttentionMetadata.build([(t, c, n) for (c, n), t in zip(specs, tables)], block_size,
                                       cache.pad_block, torch.device(device))
    errors = []
    for layer in range(num_layers):
        q = torch.randn(sum(n for _, n in specs), num_heads, head_dim, generator=gen).to(dtype)
        new_k = torch.cat([k[layer, c:] for (c, _), k in zip(specs, keys)])
        new_v = torch.cat([v[layer, c:] for (c, _), v in zip(specs, values)])
        out = PagedAttention(cache, metadata).attend(layer, q.to(device), new_k.to(device), new_v.to(device),
                                                     0.25, window).cpu()
        row = 0
        for (cached, new), k, v in zip(specs, keys, values):
            mask = causal_mask(new, cached + new, window, "cpu")
            ref = sdpa_attention(q[row:row + new].float(), k[layer].float(), v[layer].float(), 0.25, mask)
            errors.append(float((out[row:row + new].float() - ref).abs().max()))
            row += new
    return errors


MIXED = [(5, 1), (0, 1), (13, 1), (0, 9), (6, 5), (3, 1), (8, 8)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 3, 8])
def test_mixed_batch_matches_dense_oracle(num_heads, num_kv_heads, window):
    assert max(run_batch(MIXED, num_heads, num_kv_heads, window)) < 1e-5


def test_decode_only_batch_with_equal_and_unequal_lengths():
    assert max(run_batch([(7, 1), (7, 1), (7, 1)], 4, 2, None)) < 1e-5
    assert max(run_batch([(1, 1), (30, 1), (12, 1)], 4, 2, None)) < 1e-5
    assert max(run_batch([(30, 1), (30, 1)], 4, 2, 5)) < 1e-5  # equal lengths, window masks


def test_prefill_after_cached_prefix_and_chunk_boundaries():
    # cached prefix ending mid-block, on a block boundary, and a chunk continuing a prompt
    assert max(run_batch([(6, 7), (8, 4), (4, 1), (0, 16)], 4, 2, None)) < 1e-5


def test_bfloat16_cache_stays_close_to_the_fp32_oracle():
    assert max(run_batch(MIXED, 4, 2, None, dtype=torch.bfloat16)) < 3e-2
