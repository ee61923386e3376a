"""Decode steps through zili's fused C++ decoder layers (torch.classes.zili_cpu.DecodeLayers).

A decode step computes one new token per sequence. Its time should be the time to read the
weights once; through the Python model each of the 24 layers of a small model also costs ~50
small PyTorch ops (norms, rotary, cache writes, gathers, attention, activation, residuals), which
on a 2-core CPU added ~30% to a bf16 token and more to an int8 / int4 one. `FusedDecoder` runs
all layers in one C++ call instead (their weights handed over once, at build): the same computation
(zili/kernels/cpu/decode_layer.cpp says where its roundings sit), the same weight kernels, attention
straight from the paged cache. The call also takes the embedding, the rotary rows, the final norm
and lm_head, so a step returns to Python once, with its logits.

It applies to bf16 Llama-family models on the CPU whose linear layers are bf16 or use zili's
VNNI int8 / int4 kernels (without act-order permutation), with a bf16 or int8 KV cache; anything
else keeps the Python model, which stays the oracle (tests/kernels/test_fused_decode.py).
"""

from __future__ import annotations

import torch
from torch import nn

from zili.engine.paged_attention import PagedKVCache
from zili.kernels import cpu_ext
from zili.kernels.quant_kernels import VnniKernel
from zili.layers.linear import Linear
from zili.layers.quantized.linear import QuantLinear
from zili.models.llama import LlamaForCausalLM

BF16_BITS = 16  # DecodeLayers' code for a dense bf16 weight


def _linear_args(layer: nn.Module) -> tuple[list[torch.Tensor | None], list[int], float] | None:
    """(weight, scales, zero_scales, bias), (bits, group size), zero point (where zero_scales is None) of one
    linear layer, or None when the fused layers cannot run it."""
    if isinstance(layer, Linear):
        weight, bias = layer.weight, layer.bias
        if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            return None
        return [weight, None, None, bias], [BF16_BITS, 0], 0.0
    if isinstance(layer, QuantLinear) and isinstance(layer.kernel, VnniKernel):
        kernel = layer.kernel
        if kernel.perm is not None:
            return None
        return ([kernel.weight, kernel.scales, kernel.zero_scales, layer.bias], [kernel.bits, kernel.group_size],
                kernel.zero_point or 0.0)
    return None


class FusedDecoder:
    """Runs a decode-only batch through all of the model's layers in one C++ call."""

    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, layers: list[tuple[list, list, list]],
                 max_batch: int):
        self.model = model
        self.cache = cache
        self.layers = torch.classes.zili_cpu.DecodeLayers()
        for tensors, ints, floats in layers:
            self.layers.add(tensors, ints, floats)
        self.max_batch = max_batch
        """Most sequences per step: up to the rows where the weight kernels beat PyTorch's GEMM
        (cpu_ext.MAX_KERNEL_ROWS); larger batches run the Python model."""
        self.vocab_size = 0
        """Logits per row of the fused head (DecodeLayers.set_head); 0 where the head stays in Python."""

    @classmethod
    def build(cls, model: nn.Module, cache: PagedKVCache) -> "FusedDecoder | None":
        """The fused decoder for this model and cache, or None where it does not apply."""
        if not isinstance(model, LlamaForCausalLM) or cache.dtype != torch.bfloat16 or cache.kv.device.type != "cpu":
            return None
        if not cpu_ext.available():
            return None
        layers, kinds = [], set()
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                     attn.q_norm.weight if attn.q_norm is not None else None,
                     attn.k_norm.weight if attn.k_norm is not None else None]
            if any(n is not None and n.dtype != torch.bfloat16 for n in norms):
                return None
            tensors, codes, zero_points = list(norms), [], []
            for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                args = _linear_args(linear)
                if args is None or any(t is not None and t.device.type != "cpu" for t in args[0]):
                    return None
                tensors += args[0]
                codes += args[1]
                zero_points.append(args[2])
                kinds.add("bf16" if args[1][0] == BF16_BITS else "quant")
            ints = [index, attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.sliding_window or 0,
                    cache.block_size, mlp.act.code, *codes]
            layers.append((tensors, ints, [layer.input_layernorm.eps, attn.scale, *zero_points]))
        fused = cls(model, cache, layers, min(cpu_ext.MAX_KERNEL_ROWS[kind] for kind in kinds))
        inner = model.model
        embedding, norm, head = inner.embed_tokens.weight, inner.norm.weight, _linear_args(model.lm_head)
        if (embedding.dtype == torch.bfloat16 and embedding.is_contiguous() and embedding.device.type == "cpu"
                and norm.dtype == torch.bfloat16 and head is not None
                and all(t is None or t.device.type == "cpu" for t in head[0])):
            fused.layers.set_head([embedding, norm, *head[0]], head[1], [inner.norm.eps, head[2]])
            fused.vocab_size = head[0][0].shape[0]
        return fused

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """input_ids, positions (B,) int64; block_tables (B, W) int64 -> final hidden states (B, H), after the
        final norm. Each new token is the last of its sequence: it attends over positions 0..position
        (sliding window permitting)."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids).contiguous()              # (B, H), updated in place
        cos, sin = inner.rotary_emb.cos_sin(positions, hidden.dtype)      # (B, rotary_dim)
        self.layers.forward(hidden, cos, sin, self.cache.kv, self.cache.scales, block_tables, positions + 1)
        return inner.norm(hidden)

    @torch.inference_mode()
    def forward(self, input_ids: list[int], positions: list[int],
                block_tables: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """One decode step, as `hidden_states` takes it -> fp32 logits (B, vocab), as model.compute_logits
        gives them, and each row's argmax where the C++ step computed it (else None).

        With the head fused (the usual case) the whole step is one C++ call: embedding, rotary rows, layers,
        final norm, lm_head. Every return to Python costs more than its few ops suggest: the step has just
        streamed the weights through the caches, so the next op finds its code and data cold (~0.3 ms on
        the 2-core benchmark machine, ~3% of an int4 token)."""
        ids, where = torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
        rope = self._rope(max(positions) + 1)
        if rope is None:  # no fused head, or a rotary table that depends on the sequence length
            return self.model.compute_logits(self.hidden_states(ids, where, block_tables)), None
        logits = torch.empty(len(input_ids), self.vocab_size, dtype=torch.float32)
        argmax = self.layers.step(ids, where, rope, self.cache.kv, self.cache.scales, block_tables, logits)
        return logits, argmax

    def _rope(self, positions: int) -> torch.Tensor | None:
        """The rotary table the one-call step reads for positions below `positions`, or None where that step
        cannot run: no fused head, or a table that depends on the sequence length there."""
        return self.model.model.rotary_emb.table(positions, torch.device("cpu")) if self.vocab_size else None

    def takes_steps(self, positions: int) -> bool:
        """Whether greedy_steps runs over positions below `positions`."""
        return self._rope(positions) is not None

    @torch.inference_mode()
    def greedy_steps(self, input_ids: list[int], positions: list[int], block_tables: torch.Tensor,
                     count: int, stop_ids: list[list[int]]) -> list[list[int]]:
        """Up to `count` greedy decode steps in one C++ call, each row's argmax its next input at the next position
        (block_tables must already hold those positions, and takes_steps(max(positions) + count) must hold)
        -> each row's new tokens. The call ends after the first step in which any row produced one of its
        `stop_ids` (its sequence is done: the group stops there, not count steps later), so rows may get
        fewer than `count` tokens, all the same number."""
        rope = self._rope(max(positions) + count)
        if rope is None:
            raise ValueError("greedy_steps needs the fused head and a rotary table independent of the length")
        ids, where = torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
        width = max((len(row) for row in stop_ids), default=0)
        stops = torch.tensor([row + [-1] * (width - len(row)) for row in stop_ids], dtype=torch.long)  # (B, width)
        logits = torch.empty(len(input_ids), self.vocab_size, dtype=torch.float32)
        flat = self.layers.steps(ids, where, rope, self.cache.kv, self.cache.scales, block_tables, logits, count, stops)
        rows = len(input_ids)
        return [flat[b::rows] for b in range(rows)]
