"""The reference generation loop: sampling filters (statistically), stop conditions, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from zili.generation import find_stop, generate_tokens, sample_token
from zili.models.loader import load_model
from zili.sampling_params import SamplingParams

PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02])
LOGITS = PROBS.log()
DRAWS = 3000


def draw(logits: torch.Tensor, params: SamplingParams, seed: int = 0, draws: int = DRAWS) -> torch.Tensor:
    """Counts per token id over `draws` samples."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.numel(), dtype=torch.long)
    for _ in range(draws):
        counts[sample_token(logits.clone(), params, generator)] += 1
    return counts


def sampled_ids(counts: torch.Tensor) -> set[int]:
    return set(torch.nonzero(counts)[:, 0].tolist())


def assert_frequencies(counts: torch.Tensor, expected_probs: torch.Tensor) -> None:
    """Each token's frequency within 4.5 standard deviations of its binomial expectation."""
    n = counts.sum().item()
    for count, p in zip(counts.tolist(), expected_probs.tolist()):
        sigma = math.sqrt(n * p * (1 - p)) or 1e-9
        assert abs(count - n * p) <= 4.5 * sigma + 1e-9, (count, n * p)


def test_greedy_is_argmax():
    logits = torch.randn(50)
    assert sample_token(logits, SamplingParams(temperature=0.0), None) == int(logits.argmax())


def test_plain_sampling_follows_softmax():
    counts = draw(LOGITS, SamplingParams(temperature=1.0))
    assert_frequencies(counts, PROBS / PROBS.sum())
    assert sampled_ids(counts) == set(range(len(PROBS)))


def test_temperature_sharpens_and_flattens():
    for temperature in (0.5, 1.7):
        expected = (LOGITS / temperature).softmax(-1)
        assert_frequencies(draw(LOGITS, SamplingParams(temperature=temperature), seed=1), expected)


@pytest.mark.parametrize("top_k", [1, 2, 3, 6])
def test_top_k_samples_only_the_k_best(top_k):
    counts = draw(LOGITS, SamplingParams(temperature=1.0, top_k=top_k))
    assert sampled_ids(counts) == set(range(top_k))
    kept = PROBS[:top_k]
    assert_frequencies(counts[:top_k], kept / kept.sum())


@pytest.mark.parametrize("top_p, kept", [(0.01, 1), (0.5, 2), (0.64, 2), (0.7, 3), (0.85, 4), (0.999, 7)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    counts = draw(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert sampled_ids(counts) == set(range(kept))
    assert_frequencies(counts[:kept], PROBS[:kept] / PROBS[:kept].sum())


def test_top_k_then_top_p():
    # top_k=4 renormalizes to [0.444, 0.278, 0.167, 0.111]; top_p=0.6 then keeps the first two
    counts = draw(LOGITS, SamplingParams(temperature=1.0, top_k=4, top_p=0.6))
    assert sampled_ids(counts) == {0, 1}


def test_sampling_is_reproducible_with_a_seeded_generator():
    params = SamplingParams(temperature=1.0)
    assert torch.equal(draw(LOGITS, params, seed=5, draws=200), draw(LOGITS, params, seed=5, draws=200))


def test_find_stop():
    assert find_stop("hello world", ["wor", "lo"], 0) == (3, "lo")
    assert find_stop("hello world", ["wor", "lo"], 4) == (6, "wor")
    assert find_stop("hello", ["xyz"], 0) is None
    assert find_stop("abcabc", ["abc"], -5) == (0, "abc")


# ---- the loop on a tiny model --------------------------------------------------------------

PROMPT = [0, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)[0]


def run(model, eos_ids=(), max_model_len=256, prompt=PROMPT, **params):
    steps = list(generate_tokens(model, list(prompt), SamplingParams(**params), list(eos_ids), max_model_len))
    return [s.token_id for s in steps], [s.finish_reason for s in steps]


@pytest.fixture(scope="module")
def greedy_tokens(model):
    return run(model, temperature=0.0, max_tokens=12)[0]


def _first_new_token_index(tokens: list[int], start: int) -> int:
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_max_tokens_ends_with_length(model, greedy_tokens):
    tokens, reasons = run(model, temperature=0.0, max_tokens=5)
    assert tokens == greedy_tokens[:5]
    assert reasons == [None] * 4 + ["length"]


def test_eos_ends_with_stop(model, greedy_tokens):
    index = _first_new_token_index(greedy_tokens, 3)
    tokens, reasons = run(model, eos_ids=[greedy_tokens[index]], temperature=0.0, max_tokens=12)
    assert tokens == greedy_tokens[:index + 1]
    assert reasons[-1] == "stop" and reasons[:-1] == [None] * index


def test_stop_token_ids_end_with_stop(model, greedy_tokens):
    index = _first_new_token_index(greedy_tokens, 2)
    tokens, reasons = run(model, temperature=0.0, max_tokens=12, stop_token_ids=[greedy_tokens[index]])
    assert tokens == greedy_tokens[:index + 1] and reasons[-1] == "stop"


def test_ignore_eos(model, greedy_tokens):
    tokens, reasons = run(model, eos_ids=[greedy_tokens[1]], temperature=0.0, max_tokens=12, ignore_eos=True)
    assert tokens == greedy_tokens and reasons[-1] == "length"


def test_min_tokens_masks_stop_tokens(model, greedy_tokens):
    eos = greedy_tokens[0]
    tokens, _ = run(model, eos_ids=[eos], temperature=0.0, max_tokens=12, min_tokens=4)
    assert eos not in tokens[:4]
    assert tokens[0] != greedy_tokens[0]  # the best token was masked, so the second best came instead


def test_context_length_limits_new_tokens(model, greedy_tokens):
    tokens, reasons = run(model, max_model_len=len(PROMPT) + 3, temperature=0.0, max_tokens=None)
    assert tokens == greedy_tokens[:3] and reasons[-1] == "length"


@pytest.mark.parametrize("prompt, max_model_len, message", [([], 256, "empty"), (PROMPT, len(PROMPT), "no room")])
def test_bad_prompts(model, prompt, max_model_len, message):
    with pytest.raises(ValueError, match=message):
        run(model, prompt=prompt, max_model_len=max_model_len)


def test_seed_reproducibility(model):
    first = run(model, temperature=1.0, max_tokens=16, seed=123)[0]
    assert run(model, temperature=1.0, max_tokens=16, seed=123)[0] == first
    others = [run(model, temperature=1.0, max_tokens=16, seed=seed)[0] for seed in (1, 2, 3)]
    assert any(other != first for other in others)


def test_sampled_tokens_respect_top_k(model):
    """Every sampled token is among the top-k of the logits that produced it (checked by recomputing)."""
    from zili.layers.attention import DenseKVCache

    tokens, _ = run(model, temperature=1.5, top_k=3, max_tokens=16, seed=9)
    sequence = PROMPT + tokens
    config = model.config
    cache = DenseKVCache(config.num_hidden_layers, len(sequence), config.num_key_value_heads, config.head_dim,
                         torch.float32, "cpu")
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.tensor(sequence), torch.arange(len(sequence)), cache))
    top3 = logits[len(PROMPT) - 1:-1].topk(3).indices
    assert all(token in row.tolist() for token, row in zip(tokens, top3))
