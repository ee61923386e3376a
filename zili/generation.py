"""The reference generation loop: one sequence, a dense KV cache, plain sampling.

Deliberately simple and readable. The serving engine is faster; this loop is the oracle its
tests compare against (greedy outputs must be token-identical).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from zili.layers.attention import DenseKVCache
from zili.sampling_params import SamplingParams


@dataclass
class StepResult:
    token_id: int
    finish_reason: str | None  # "stop" / "length" once the sequence ends


def find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """First stop string in text[search_from:]; returns (index, stop string) or None."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, search_from))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: (vocab,) fp32 -> one token id (greedy, temperature, top-k, top-p)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(model: nn.Module, prompt_ids: list[int], params: SamplingParams,
                    eos_token_ids: list[int], max_model_len: int) -> Iterator[StepResult]:
    """Yield generated tokens one by one; the last one carries the finish reason.

    Stop strings are text-level and handled by the caller (see `find_stop`).
    """
    config = model.config
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {max_model_len}")
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    cache = DenseKVCache(config.num_hidden_layers, len(prompt_ids) + max_new, config.num_key_value_heads,
                         config.head_dim, dtype, device)
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    tokens = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    for step in range(max_new):
        positions = torch.arange(cache.length, cache.length + tokens.numel(), device=device)
        hidden = model(tokens, positions, cache)
        cache.advance(tokens.numel())
        logits = model.compute_logits(hidden[-1:])[0]
        if step < params.min_tokens:  # as vLLM: stop tokens cannot be sampled before min_tokens
            logits[[i for i in stop_ids if i < logits.numel()]] = float("-inf")
        token = sample_token(logits, params, generator)
        if token in stop_ids:
            yield StepResult(token, "stop")
            return
        yield StepResult(token, "length" if step + 1 == max_new else None)
        tokens = torch.tensor([token], dtype=torch.long, device=device)
