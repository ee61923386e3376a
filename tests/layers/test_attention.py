"""The dense reference attention: masks, GQA, and a KV cache that gives the same result in chunks."""

from __future__ import annotations

import math

import pytest
import torch

from zili.layers.attention import DenseKVCache, causal_mask, sdpa_attention


def naive_attention(q, k, v, scale, sliding_window=None):
    """Loop-by-loop softmax attention: q (Tq, Hq, D) are the last Tq of the Tk positions in k / v."""
    num_queries, num_heads, _ = q.shape
    num_keys, num_kv_heads, _ = k.shape
    out = torch.zeros_like(q)
    for t in range(num_queries):
        pos = num_keys - num_queries + t
        visible = [j for j in range(num_keys) if j <= pos and (sliding_window is None or pos - j < sliding_window)]
        for h in range(num_heads):
            kv = h // (num_heads // num_kv_heads)
            scores = torch.stack([q[t, h] @ k[j, kv] for j in visible]) * scale
            weights = scores.softmax(0)
            out[t, h] = sum(w * v[j, kv] for w, j in zip(weights, visible))
    return out


@pytest.mark.parametrize("num_queries, num_keys, window", [(5, 5, None), (3, 9, None), (9, 9, 4), (1, 12, 3),
                                                           (4, 4, 1)])
def test_causal_mask(num_queries, num_keys, window):
    mask = causal_mask(num_queries, num_keys, window, torch.device("cpu"))
    for i in range(num_queries):
        pos = num_keys - num_queries + i
        for j in range(num_keys):
            assert bool(mask[i, j]) == (j <= pos and (window is None or pos - j < window))


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_matches_naive_attention(num_kv_heads, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 4, 8), torch.randn(10, num_kv_heads, 8), torch.randn(10, num_kv_heads, 8)
    scale = 1 / math.sqrt(8)
    mask = causal_mask(6, 10, window, q.device)
    torch.testing.assert_close(sdpa_attention(q, k, v, scale, mask), naive_attention(q, k, v, scale, window))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunks", [[12], [7, 5], [4, 1, 1, 6], [1] * 12])
def test_dense_cache_in_chunks_equals_one_pass(chunks, window):
    torch.manual_seed(1)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    expected = naive_attention(q, k, v, 0.3, window)
    cache = DenseKVCache(num_layers=2, max_tokens=12, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    outputs, start = [], 0
    for size in chunks:
        end = start + size
        cache.attend(0, q[start:end] * 2, k[start:end] * 2, v[start:end], 0.3, window)  # layer 0: other data
        outputs.append(cache.attend(1, q[start:end], k[start:end], v[start:end], 0.3, window))
        cache.advance(size)
        start = end
    torch.testing.assert_close(torch.cat(outputs), expected)


def test_dense_cache_refuses_overflow():
    cache = DenseKVCache(1, 4, 1, 8, torch.float32, "cpu")
    x = torch.randn(5, 1, 8)
    with pytest.raises(RuntimeError, match="holds 4 tokens"):
        cache.attend(0, x, x, x, 1.0, None)
