"""Turns a SchedulerOutput into one forward pass: flat batch tensors in, logits out.

What belongs here: building input ids / positions / attention metadata from the scheduled
chunks, owning the paged KV cache tensors, running the model and computing logits for the rows
that need them (the last token of each sampling chunk, and prompt positions whose logprobs were
asked for). Sampling and bookkeeping live elsewhere.

Batch order: single-token chunks (decodes) first, then multi-token chunks (prefills), so the
attention backend handles all decodes in one batched call. A batch of decodes only goes through
`FusedDecoder` (the whole step, logits included, in one C++ call) where the model and cache allow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zili.config import ModelConfig
from zili.engine.fused_decode import FusedDecoder
from zili.engine.paged_attention import AttentionMetadata, PagedAttention, PagedKVCache, padded_block_tables
from zili.engine.scheduler import SchedulerOutput
from zili.engine.sequence import Request, Sequence


@dataclass
class ModelOutput:
    sample_seqs: list[Sequence]
    sample_logits: torch.Tensor
    """(len(sample_seqs), vocab) fp32: next-token logits of each sequence that samples."""
    prompt_rows: list[tuple[Request, int, int]] = field(default_factory=list)
    """(request, position p, token at p + 1) for each prompt-logprob row."""
    prompt_logits: torch.Tensor | None = None
    """(len(prompt_rows), vocab) fp32."""
    sample_argmax: list[int] | None = None
    """Each sample row's argmax over sample_logits, where the fused decode step computed it."""


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, num_blocks: int, block_size: int,
                 kv_cache_dtype: str = "auto", fused_decode: bool = True):
        self.model = model
        self.block_size = block_size
        weights = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = weights.device, weights.dtype
        self.kv_cache = PagedKVCache(model_config.num_hidden_layers, num_blocks, block_size,
                                     model_config.num_key_value_heads, model_config.head_dim,
                                     self.dtype, self.device, kv_cache_dtype)
        self.fused = FusedDecoder.build(model, self.kv_cache) if fused_decode else None

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        chunks = sorted(out.chunks, key=lambda c: c.num_tokens != 1)  # stable: decodes first
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[Request, int, int]] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            first_row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
            recorded = seq.request.prompt_logprobs
            if recorded is not None and start < seq.num_prompt_tokens - 1:
                # logits at position p give the logprob of prompt token p + 1; skip recorded ones
                for p in range(max(start, len(recorded) - 1), min(end, seq.num_prompt_tokens - 1)):
                    prompt_rows.append(first_row + p - start)
                    prompt_targets.append((seq.request, p, seq.token_ids[p + 1]))
        rows = sample_rows + prompt_rows
        argmax = None
        if self.fused is not None and len(input_ids) == len(chunks) <= self.fused.max_batch:  # decodes only
            logits, argmax = self._fused_decode(chunks, input_ids, positions)         # (T, vocab), every row
            if rows != list(range(len(input_ids))):
                logits = logits[rows]
                argmax = [argmax[r] for r in rows] if argmax is not None else None
        else:
            metadata = AttentionMetadata.build([(c.seq.block_table, c.start, c.num_tokens) for c in chunks],
                                               self.block_size, self.kv_cache.pad_block, self.device)
            hidden = self.model(self._to_device(input_ids), self._to_device(positions),
                                PagedAttention(self.kv_cache, metadata))               # (T, hidden)
            logits = self.model.compute_logits(hidden[self._to_device(rows)])
        num_samples = len(sample_rows)
        return ModelOutput(sample_seqs, logits[:num_samples], prompt_targets,
                           logits[num_samples:] if prompt_rows else None,
                           argmax[:num_samples] if argmax is not None else None)

    @torch.inference_mode()
    def execute_greedy_steps(self, out: SchedulerOutput, count: int, stop_ids: list[list[int]]) -> list[list[int]]:
        """Up to `count` greedy decode steps of a batch of decodes in one fused call: per chunk, its new tokens
        (the group ends after the first step in which a chunk produced one of its `stop_ids`). The engine
        checked that the fused step takes the batch (FusedDecoder.takes_steps, max_batch) and gave each
        sequence the blocks for `count` steps."""
        chunks = out.chunks
        tables = padded_block_tables([c.seq.block_table for c in chunks], self.kv_cache.pad_block)
        return self.fused.greedy_steps([c.seq.token_ids[c.start] for c in chunks], [c.start for c in chunks], tables,
                                       count, stop_ids)

    def _fused_decode(self, chunks, input_ids: list[int], positions: list[int]) -> tuple[torch.Tensor, list[int] | None]:
        tables = padded_block_tables([c.seq.block_table for c in chunks], self.kv_cache.pad_block)
        return self.fused.forward(input_ids, positions, tables)
