"""Batched sampling: every request's own SamplingParams applied in one pass over (B, vocab) logits.

Order of operations per row (vLLM's): logit_bias, min_tokens (stop tokens masked until enough
tokens exist), repetition penalty (prompt + output tokens, Hugging Face's divide / multiply rule),
presence and frequency penalties (output tokens, OpenAI's definition), then greedy rows take the
argmax; the others divide by their temperature, keep their top_k, then the smallest set reaching
top_p, then the tokens with at least min_p times the top probability, and sample.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws token i with
probability p_i. A seeded row draws its E from its own `torch.Generator`, advanced by exactly one
vocabulary-sized draw per sampled token, so its tokens depend only on its seed and its logits,
never on what else is in the batch. Unseeded rows share one draw from the global generator.

Logprobs (sampled token and top alternatives) are those of the raw model logits (log_softmax
before any penalty, bias or temperature), as vLLM and OpenAI return them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zili.outputs import Logprob
from zili.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs about one sequence (plain Python values)."""

    params: SamplingParams
    output_token_ids: list[int]
    prompt_token_ids: list[int]
    blocked_token_ids: list[int] = field(default_factory=list)
    """Token ids forbidden at this step (stop tokens while min_tokens is not reached)."""
    generator: torch.Generator | None = None
    """The row's own random stream when its request is seeded."""


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]
    """Per row, when its params ask for logprobs."""


class Sampler:
    """Applies per-row sampling parameters to fp32 logits and picks one token per row."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._generators: dict[int, torch.Generator] = {}

    def generator(self, key: int, seed: int | None) -> torch.Generator | None:
        """The persistent generator of stream `key` (one per sequence), created from `seed`."""
        if seed is None:
            return None
        if key not in self._generators:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self._generators[key] = generator
        return self._generators[key]

    def forget(self, key: int) -> None:
        self._generators.pop(key, None)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], argmax: list[int] | None = None) -> SamplerOutput:
        """logits: (B, vocab) fp32, one row per entry of `rows`; argmax: each row's argmax over `logits`
        where the caller has it already (the fused decode step), used when nothing changes the logits."""
        num_top = [r.params.logprobs for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in num_top) else None
        processed = self._process(logits, rows)
        greedy = [r.params.greedy for r in rows]
        if all(greedy) and argmax is not None and processed is logits:
            token_list = list(argmax)
        elif all(greedy):
            token_list = processed.argmax(dim=-1).tolist()
        else:
            tokens = self._sample(processed, rows)
            if any(greedy):
                tokens = torch.where(torch.tensor(greedy, device=logits.device), processed.argmax(dim=-1), tokens)
            token_list = tokens.tolist()
        logprobs: list[Logprob | None] = [None] * len(rows)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_list, num_top)
        return SamplerOutput(token_list, logprobs)

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Bias, min_tokens and penalties; returns a new tensor only when something applies."""
        vocab = logits.shape[1]
        bias_rows, bias_cols, bias_vals = [], [], []
        for i, row in enumerate(rows):
            for token, bias in (row.params.logit_bias or {}).items():
                bias_rows.append(i), bias_cols.append(token), bias_vals.append(float(bias))
            for token in row.blocked_token_ids:
                if token < vocab:
                    bias_rows.append(i), bias_cols.append(token), bias_vals.append(_NEG_INF)
        penalized = [r.params.penalized for r in rows]
        if not bias_rows and not any(penalized):
            return logits
        logits = logits.clone()
        device = logits.device
        if any(penalized):
            rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
            if (rep != 1.0).any():
                seen = token_counts([r.prompt_token_ids + r.output_token_ids if p else [] for r, p in
                                     zip(rows, penalized)], vocab, device) > 0
                scaled = torch.where(logits > 0, logits / rep, logits * rep)
                logits = torch.where(seen, scaled, logits)
            counts = token_counts([r.output_token_ids if p else [] for r, p in zip(rows, penalized)], vocab, device)
            freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
            presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
            logits -= freq * counts + presence * (counts > 0).float()
        if bias_rows:
            index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_cols, device=device))
            logits.index_put_(index, torch.tensor(bias_vals, device=device), accumulate=True)
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device, (batch, vocab) = logits.device, logits.shape
        temperature = torch.tensor([r.params.temperature or 1.0 for r in rows], device=device)
        logits = logits / temperature[:, None]
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        top_p = [r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in rows]  # 2.0: never masks
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            logits = apply_top_k_top_p(logits, torch.tensor(top_k, device=device),
                                       torch.tensor(top_p, device=device))
        probs = torch.softmax(logits, dim=-1)
        min_p = [r.params.min_p for r in rows]
        if any(min_p):
            threshold = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)

    def prompt_logprobs(self, logits: torch.Tensor, target_ids: list[int], num_top: list[int]) -> list[Logprob]:
        """Row i of logits predicts target_ids[i]; raw-logit logprobs with num_top[i] alternatives."""
        return gather_logprobs(torch.log_softmax(logits, dim=-1), target_ids, num_top)


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, vocab) fp32 count of each token id per row."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    if width:
        ids = torch.tensor([t + [vocab] * (width - len(t)) for t in token_lists], device=device)
        counts.scatter_add_(1, ids.clamp_(max=vocab), torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) all but each row's top_k logits, then all but the smallest prefix of the
    remaining distribution whose probability reaches top_p (the top token always survives)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits.masked_fill_(ranks >= top_k[:, None], _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits.masked_fill_(mass_before >= top_p[:, None], _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def gather_logprobs(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int | None]) -> list[Logprob | None]:
    """logprobs: (B, vocab) -> per row the chosen token's logprob and its num_top best alternatives."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    max_top = max((k for k in num_top if k), default=0)
    top_values = top_ids = None
    if max_top:
        top = logprobs.topk(max_top, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    result: list[Logprob | None] = []
    for i, k in enumerate(num_top):
        if k is None:
            result.append(None)
            continue
        alternatives = dict(zip(top_ids[i][:k], top_values[i][:k])) if k else {}
        result.append(Logprob(token_ids[i], chosen[i], alternatives))
    return result
