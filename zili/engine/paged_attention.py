"""Attention over the paged KV cache: the serving engine's `AttentionBackend`.

Cache layout, one tensor for all layers: (num_layers, 2 [k, v], num_kv_heads, num_slots, head_dim)
with slot = block_id * block_size + offset. One extra block at the end (`pad_slot` onwards) is kept
at zero: padded gather indices point there, so masked-out positions never read uninitialised
memory (0 * NaN would poison the output).

With `kv_cache_dtype="int8"` the cache stores int8 k / v plus one fp16 scale per (token, head) in
`scales` (num_layers, 2, num_kv_heads, num_slots) (zili/layers/kv_quant.py); writes quantize the
new tokens, reads dequantize only the gathered slots to the compute dtype. Attention over a
segment's own new tokens uses the same int8-rounded values, so a prefix-cache hit and a miss
attend over identical keys and values.

A flat batch holds decode tokens first (sequences computing exactly one token), then prefill
segments (several tokens of one sequence, possibly after a cached prefix or earlier chunks):

- decodes: one batched gather of every sequence's context (padded to the longest), then one
  batched `scaled_dot_product_attention` call with grouped-query heads (no repeat_interleave);
- prefills: per segment, `scaled_dot_product_attention` over the gathered context with a causal
  (and sliding-window) mask offset by the number of tokens already cached; a segment without a
  cached prefix attends over its own new k / v directly (no gather).

Index tensors are built once per step (`AttentionMetadata.build`) and shared by all layers.
The dense `zili.layers.attention.sdpa_attention` is the test oracle for both paths.

On the CPU the cache lives on transparent huge pages (zili.huge_pages): a decode step of 16
sequences touches thousands of scattered cache pages (every layer, k / v, head and block), and
on 4 KiB pages their TLB misses took 9-18% of a bf16 step (measured at 64-200 tokens of context).
A fresh mapping reads as zero, so the pad block needs no write: the memory of each 2 MiB stretch
is committed when the first block in it is written (block 0's at allocation, see `_allocate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zili import huge_pages
from zili.layers.attention import causal_mask
from zili.layers.kv_quant import KV_SCALE_DTYPE, dequantize_kv, quantize_kv, round_trip_kv


class PagedKVCache:
    """The KV tensors of every layer, `num_blocks` blocks of `block_size` slots plus a zero pad block.

    `dtype` is the compute dtype reads return; `kv_cache_dtype` ("auto" or "int8") how k / v are stored.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, kv_cache_dtype: str = "auto"):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.pad_block = num_blocks
        self.pad_slot = num_blocks * block_size
        num_slots = (num_blocks + 1) * block_size
        quantized = kv_cache_dtype == "int8"
        self.kv = self._allocate((num_layers, 2, num_kv_heads, num_slots, head_dim),
                                 torch.int8 if quantized else dtype, torch.device(device))
        self.scales: torch.Tensor | None = None
        """int8 only: (num_layers, 2, num_kv_heads, num_slots) fp16 scale of each stored vector."""
        if quantized:
            self.scales = self._allocate((num_layers, 2, num_kv_heads, num_slots), KV_SCALE_DTYPE, torch.device(device))

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Uninitialized except for the pad block, which reads as zero; memory is committed as it is
        written (never zeros(): on the CPU it would commit the whole budget up front).

        On huge pages, the first block of every (layer, k|v, head) stretch is committed here: the block
        manager hands out block 0 first, and committing a fresh 2 MiB page costs ~3 ms (the kernel clears
        it, the hypervisor backs it). The first request would otherwise wait for all of them at once
        (~0.5 s for 96 stretches of the benchmark model); later blocks commit a page now and then."""
        if device.type == "cpu" and huge_pages.enabled():
            buffer = huge_pages.huge_page_buffer(math.prod(shape) * dtype.itemsize)  # a fresh mapping: all zero
            tensor = buffer.view(dtype).view(shape)
            tensor[:, :, :, :self.block_size].zero_()
            return tensor
        tensor = torch.empty(shape, dtype=dtype, device=device)
        tensor[:, :, :, self.pad_slot:].zero_()
        return tensor

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        vectors = num_layers * 2 * num_kv_heads * block_size  # one k and one v vector per layer, head, slot
        if kv_cache_dtype == "int8":
            return vectors * (head_dim + KV_SCALE_DTYPE.itemsize)  # int8 values + one scale
        return vectors * head_dim * dtype.itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, Hkv, D) of new tokens at slots (T,)."""
        for index, x in enumerate((k, v)):
            if self.scales is None:
                self.kv[layer, index].index_copy_(1, slots, x.transpose(0, 1))
            else:
                values, scales = quantize_kv(x)                                 # (T, Hkv, D), (T, Hkv)
                self.kv[layer, index].index_copy_(1, slots, values.transpose(0, 1))
                self.scales[layer, index].index_copy_(1, slots, scales.transpose(0, 1))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: (N,) -> keys, values (Hkv, N, D) in the compute dtype (only these slots dequantized)."""
        kv = self.kv[layer].index_select(2, slots)                                 # (2, Hkv, N, D)
        if self.scales is not None:
            # indexing, not index_select: 4x faster on CPU for rows of one element
            kv = dequantize_kv(kv, self.scales[layer][:, :, slots], self.dtype)
        return kv[0], kv[1]

    def as_stored(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New tokens' k, v (T, Hkv, D) as `gather` will return them after `write`."""
        if self.scales is None:
            return k, v
        return round_trip_kv(k), round_trip_kv(v)


def padded_block_tables(tables: list[list[int]], pad_block: int) -> torch.Tensor:
    """(B, W) int64: each sequence's block table padded with the pad block to the longest."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [pad_block] * (width - len(t)) for t in tables], dtype=torch.long)


@dataclass
class PrefillSegment:
    token_start: int
    token_end: int
    """[token_start, token_end) rows of the flat batch belong to this segment."""
    context_len: int
    """Keys attended by the last query: cached prefix + this segment's tokens."""
    context_slots: torch.Tensor | None
    """(context_len,) cache slots to gather; None when there is no cached prefix."""
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """(T,) int64 cache slot receiving each new token's k / v."""
    num_decode_tokens: int
    decode_slots: torch.Tensor | None
    """(B, L) int64 context slots of each decode sequence, padded with the pad slot."""
    decode_context_lens: torch.Tensor | None
    """(B,) int64 context length (new token included) of each decode sequence."""
    decode_uniform: bool
    """All decode contexts have the same length (no padding mask needed)."""
    prefills: list[PrefillSegment]
    _decode_masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def build(cls, segments: list[tuple[list[int], int, int]], block_size: int, pad_block: int,
              device: torch.device) -> "AttentionMetadata":
        """segments: (block_table, start position, num_tokens) per sequence, decodes (num_tokens 1) first."""
        slots: list[int] = []
        decode_tables, decode_lens, prefills = [], [], []
        for table, start, num_tokens in segments:
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(start, start + num_tokens))
            if num_tokens == 1 and not prefills:
                decode_tables.append(table)
                decode_lens.append(start + 1)
                continue
            context_slots = None
            if start > 0:
                blocks = torch.tensor(table[:-(-(start + num_tokens) // block_size)], dtype=torch.long)
                offsets = torch.arange(block_size, dtype=torch.long)
                context_slots = (blocks[:, None] * block_size + offsets).flatten()[:start + num_tokens]
                context_slots = context_slots.to(device, non_blocking=True)
            token_start = len(slots) - num_tokens
            prefills.append(PrefillSegment(token_start, len(slots), start + num_tokens, context_slots))
        decode_slots = decode_context_lens = None
        if decode_tables:
            tables = padded_block_tables(decode_tables, pad_block)
            lens = torch.tensor(decode_lens, dtype=torch.long)
            length = max(decode_lens)
            positions = torch.arange(length, dtype=torch.long)
            decode_slots = tables[:, positions // block_size] * block_size + positions % block_size  # (B, L)
            decode_slots.masked_fill_(positions[None, :] >= lens[:, None], pad_block * block_size)
            decode_slots = decode_slots.to(device, non_blocking=True)
            decode_context_lens = lens.to(device, non_blocking=True)
        slot_mapping = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        return cls(slot_mapping, len(decode_tables), decode_slots, decode_context_lens,
                   len(set(decode_lens)) <= 1, prefills)

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """(B, L) bool, True where a decode query may attend; None when it may attend everywhere."""
        if sliding_window not in self._decode_masks:
            lens = self.decode_context_lens
            length = self.decode_slots.shape[1]
            mask = None
            if not self.decode_uniform or (sliding_window is not None and length > sliding_window):
                positions = torch.arange(length, device=lens.device)[None, :]
                mask = positions < lens[:, None]
                if sliding_window is not None:
                    mask &= positions >= (lens[:, None] - sliding_window)
            self._decode_masks[sliding_window] = mask
        return self._decode_masks[sliding_window]


class PagedAttention:
    """`AttentionBackend` for one forward pass: stores new k / v in the paged cache and attends."""

    def __init__(self, cache: PagedKVCache, metadata: AttentionMetadata):
        self.cache = cache
        self.metadata = metadata

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, sliding_window: int | None) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D) -> (T, Hq, D)."""
        md, cache = self.metadata, self.cache
        cache.write(layer, md.slot_mapping, k, v)
        num_decode = md.num_decode_tokens
        if not md.prefills:
            return decode_attention(q, cache, layer, md.decode_slots, md.decode_mask(sliding_window), scale)
        out = torch.empty_like(q)
        if num_decode:
            out[:num_decode] = decode_attention(q[:num_decode], cache, layer, md.decode_slots,
                                                md.decode_mask(sliding_window), scale)
        for seg in md.prefills:
            rows = slice(seg.token_start, seg.token_end)
            if seg.context_slots is None:
                keys, values = cache.as_stored(k[rows], v[rows])
                keys, values = keys.transpose(0, 1), values.transpose(0, 1)        # (Hkv, Tq, D)
            else:
                keys, values = cache.gather(layer, seg.context_slots)            # (Hkv, Lk, D)
            out[rows] = prefill_attention(q[rows], keys, values, scale, sliding_window, seg)
        return out


def decode_attention(q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor,
                     allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query per sequence. q: (B, Hq, D); slots / allowed: (B, L) -> (B, Hq, D).

    One batched SDPA call over the gathered, padded contexts; `enable_gqa` lets the kernel read
    each KV head once for the query heads sharing it. (Folding those heads into explicit bmm /
    einsum calls measured no faster with PyTorch 2.13 on CPU, so the fused kernel it is.)
    """
    batch, num_heads, head_dim = q.shape
    length = slots.shape[1]
    keys, values = cache.gather(layer, slots.view(-1))                                   # (Hkv, B * L, D)
    keys = keys.view(-1, batch, length, head_dim).transpose(0, 1)                         # (B, Hkv, L, D)
    values = values.view(-1, batch, length, head_dim).transpose(0, 1)
    mask = None if allowed is None else allowed[:, None, None, :]                        # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=True)                                 # (B, Hq, 1, D)
    return out.reshape(batch, num_heads, head_dim)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      sliding_window: int | None, seg: PrefillSegment) -> torch.Tensor:
    """q: (Tq, Hq, D); keys, values: (Hkv, Lk, D), the queries being the last Tq keys -> (Tq, Hq, D)."""
    num_queries, context_len = q.shape[0], keys.shape[1]
    # a leading batch dim: 3-D inputs send CPU SDPA to its slow generic path (~14x slower here)
    queries, keys, values = q.transpose(0, 1)[None], keys[None], values[None]  # (1, H, T, D)
    if sliding_window is None and num_queries == context_len:
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        if sliding_window not in seg.masks:
            seg.masks[sliding_window] = causal_mask(num_queries, context_len, sliding_window, q.device)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=seg.masks[sliding_window],
                                             scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
