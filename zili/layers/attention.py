"""Attention over a KV cache, behind one narrow interface.

The model computes q / k / v for a flat batch of tokens and hands them to an `AttentionBackend`,
which stores k / v in its cache and returns the attention output. Two backends exist:

- `DenseKVCache` here: one sequence, contiguous cache, `scaled_dot_product_attention` with an
  explicit causal (and sliding-window) mask. It is the reference loop's cache and the oracle
  for the paged backend.
- the paged backend in `zili.engine.paged_attention`, used by the serving engine.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D) for the new tokens -> (T, Hq, D)."""
        ...


def causal_mask(num_queries: int, num_keys: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """Boolean (num_queries, num_keys) mask, True where attending is allowed.

    The queries are the last `num_queries` of `num_keys` positions. A sliding window of W lets a
    token see itself and the W - 1 tokens before it.
    """
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: torch.Tensor) -> torch.Tensor:
    """q: (Tq, Hq, D); k, v: (Tk, Hkv, D); mask: (Tq, Tk) bool -> (Tq, Hq, D)."""
    groups = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)                                        # (Hq, Tq, D)
    kh = k.transpose(0, 1).repeat_interleave(groups, dim=0)       # (Hq, Tk, D)
    vh = v.transpose(0, 1).repeat_interleave(groups, dim=0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class DenseKVCache:
    """Contiguous per-layer KV cache for a single sequence (the reference path).

    Usage: call the model with this as backend, then `advance(num_new_tokens)`.
    """

    def __init__(self, num_layers: int, max_tokens: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, max_tokens, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_tokens = max_tokens

    def attend(self, layer, q, k, v, scale, sliding_window):
        start, end = self.length, self.length + q.shape[0]
        if end > self.max_tokens:
            raise RuntimeError(f"KV cache holds {self.max_tokens} tokens; {end} requested")
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        mask = causal_mask(q.shape[0], end, sliding_window, q.device)
        return sdpa_attention(q, self.k[layer, :end], self.v[layer, :end], scale, mask)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
