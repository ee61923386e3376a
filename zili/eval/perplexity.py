"""Perplexity of a causal LM on a text, with a sliding window (the Hugging Face recipe).

Windows of `window` tokens start every `stride` tokens. Each window is one full-sequence forward
pass, and only the tokens not scored by the previous window are scored, so with stride < window
every token after the first is scored exactly once, with at least `window - stride` tokens of
left context. (With stride == window a window's first token has no context and is not scored.)

    ppl = exp(mean over scored tokens of -log p(token | preceding tokens in its window))

`kv_cache_dtype="int8"` scores the model as it runs with the engine's int8 KV cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from zili.errors import InvalidRequestError
from zili.eval.full_sequence import FullSequenceAttention

LOGITS_CHUNK_TOKENS = 256  # bounds the (tokens, vocab) fp32 logits held at once


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    tokens: int
    """Tokens scored."""
    seconds: float
    window: int
    stride: int
    kv_cache_dtype: str = "auto"


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for each window."""
    spans, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first = max(previous_end - begin, 1)
        spans.append((begin, end, first))
        previous_end = end
        if end == num_tokens:
            break
    return spans


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, first: int, kv_cache_dtype: str = "auto") -> torch.Tensor:
    """ids: (T,) one window -> summed NLL (fp64 scalar) of ids[first:] given their prefixes."""
    attention = FullSequenceAttention(kv_cache_dtype)
    hidden = model(ids, torch.arange(len(ids), device=ids.device), attention)                # (T, hidden)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(first, len(ids), LOGITS_CHUNK_TOKENS):
        end = min(start + LOGITS_CHUNK_TOKENS, len(ids))
        logprobs = torch.log_softmax(model.compute_logits(hidden[start - 1:end - 1]), dim=-1)  # (n, vocab)
        total -= logprobs.gather(1, ids[start:end, None]).double().sum().cpu()
    return total


def perplexity(model: nn.Module, token_ids: list[int], window: int, stride: int | None = None,
               progress: bool = False, kv_cache_dtype: str = "auto") -> PerplexityResult:
    """Sliding-window perplexity of `model` on `token_ids`; stride defaults to half the window."""
    if len(token_ids) < 2:
        raise InvalidRequestError("the text must have at least 2 tokens to measure perplexity", param="text")
    if window < 2:
        raise InvalidRequestError("window must be at least 2 tokens", param="window")
    stride = stride or max(window // 2, 1)
    if not 0 < stride <= window:
        raise InvalidRequestError(f"stride must be in [1, window={window}], got {stride}", param="stride")
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    start = time.perf_counter()
    nll, scored = 0.0, 0
    for begin, end, first in tqdm(window_spans(len(ids), window, stride), desc="perplexity", unit="window",
                                  disable=not progress):
        nll += float(window_nll(model, ids[begin:end], first, kv_cache_dtype))
        scored += end - begin - first
    mean = nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, time.perf_counter() - start, window, stride,
                            kv_cache_dtype)
