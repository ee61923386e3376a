"""A cache-free attention backend: every forward pass is one whole sequence, attended causally.

Used where a model scores fixed token windows (perplexity, quantization calibration) rather
than generating: no KV cache is allocated and PyTorch's fused causal SDPA keeps memory linear
in the window length when there is no sliding window to mask.

`kv_cache_dtype="int8"` rounds k / v exactly as the engine's int8 paged cache stores them
(zili/layers/kv_quant.py), so perplexity measures the quality of that cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zili.layers.attention import causal_mask, sdpa_attention
from zili.layers.kv_quant import round_trip_kv


class FullSequenceAttention:
    """`AttentionBackend` for a single, complete sequence per forward call."""

    def __init__(self, kv_cache_dtype: str = "auto"):
        self.quantize_kv = kv_cache_dtype == "int8"

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D) -> (T, Hq, D), token t attending to tokens <= t."""
        num_tokens = q.shape[0]
        if self.quantize_kv:
            k, v = round_trip_kv(k), round_trip_kv(v)
        if sliding_window is not None and sliding_window < num_tokens:
            return sdpa_attention(q, k, v, scale, causal_mask(num_tokens, num_tokens, sliding_window, q.device))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)
