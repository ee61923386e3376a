"""Held-out loss and perplexity, one method everywhere (training, model card, tests):

the text is tokenized without special tokens, cut into non-overlapping windows of the model's
context length (stride = window; a last shorter window counts if it has >= 2 tokens), each
window is scored on its own, and perplexity = exp(sum of token NLLs / number of predicted
tokens), where a window of n tokens predicts its last n - 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from zili.train.data import validation_windows
from zili.train.model import sequence_nll

EVAL_BATCH_WINDOWS = 8


@torch.no_grad()
def windowed_nll(model, tokens: torch.Tensor, window: int, rank: int = 0, world_size: int = 1,
                 autocast_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(sum of NLL, predicted tokens) over this process's share of the windows (fp32 sums)."""
    windows = validation_windows(tokens, window)[rank::world_size]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == window]
    batches = [torch.stack(full[i:i + EVAL_BATCH_WINDOWS]) for i in range(0, len(full), EVAL_BATCH_WINDOWS)]
    batches += [w[None] for w in windows if len(w) < window]
    for batch in batches:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            nll = sequence_nll(model, batch.to(device).long())
        total += float(nll.double().sum())
        count += nll.numel()
    return total, count


def perplexity(model, tokens: torch.Tensor, window: int) -> tuple[float, float, int]:
    """(perplexity, mean NLL in nats, predicted tokens) of `tokens` under `model`."""
    total, count = windowed_nll(model, tokens, window)
    return math.exp(total / count), total / count, count


def folder_perplexity(folder: str | Path, text: str, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[float, float, int]:
    """Perplexity of `text` under the saved model in `folder`, loaded by zili's own loader."""
    from zili.models.loader import load_model
    from zili.models.tokenizer import Tokenizer

    model, config = load_model(folder, device=device, dtype=dtype)
    tokens = torch.tensor(Tokenizer.from_folder(folder).encode(text, add_special_tokens=False))
    return perplexity(model, tokens, config.max_position_embeddings)
