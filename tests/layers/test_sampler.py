"""The batched sampler: filters keep exactly the right tokens, seeds are batch-independent,
penalties and biases follow their definitions, logprobs are the raw model's log-softmax."""

from __future__ import annotations

import math

import pytest
import torch

from zili.layers.sampler import Sampler, SamplingRow
from zili.sampling_params import SamplingParams

VOCAB = 12


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs + [1e-12] * (VOCAB - len(probs)), dtype=torch.float32))


def support(logits: torch.Tensor, params: SamplingParams, draws: int = 3000) -> tuple[set[int], torch.Tensor]:
    """Sample `draws` rows of the same logits in one batch; returns the tokens seen and their counts."""
    sampler = Sampler("cpu")
    torch.manual_seed(0)
    rows = [SamplingRow(params, [], []) for _ in range(draws)]
    tokens = sampler(logits.expand(draws, -1).contiguous(), rows).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=logits.numel())
    return set(torch.nonzero(counts).flatten().tolist()), counts


# probabilities 0.35, 0.25, 0.2, 0.12, 0.08 and ~0 for the rest
PROBS = [0.35, 0.25, 0.2, 0.12, 0.08]


@pytest.mark.parametrize("top_k,expected", [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3, 4})])
def test_top_k_keeps_exactly_the_k_most_likely(top_k, expected):
    seen, _ = support(probs_to_logits(PROBS), SamplingParams(temperature=1.0, top_k=top_k))
    assert seen == expected


@pytest.mark.parametrize("top_p,expected", [(0.3, {0}), (0.5, {0, 1}), (0.7, {0, 1, 2}), (0.9, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, expected):
    seen, _ = support(probs_to_logits(PROBS), SamplingParams(temperature=1.0, top_p=top_p))
    assert seen == expected


@pytest.mark.parametrize("min_p,expected", [(0.3, {0, 1, 2, 3}), (0.5, {0, 1, 2}), (0.9, {0})])
def test_min_p_keeps_tokens_above_a_fraction_of_the_top_probability(min_p, expected):
    # thresholds 0.105, 0.175, 0.315 against probabilities 0.35, 0.25, 0.2, 0.12, 0.08
    seen, _ = support(probs_to_logits(PROBS), SamplingParams(temperature=1.0, min_p=min_p))
    assert seen == expected


def test_sampled_frequencies_follow_the_temperature_scaled_distribution():
    logits = probs_to_logits(PROBS)
    draws = 6000
    _, counts = support(logits, SamplingParams(temperature=0.7), draws)
    expected = torch.softmax(logits / 0.7, dim=-1)
    for token in range(5):
        p = float(expected[token])
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[token] / draws - p) < 5 * sigma + 1e-3


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    rows = [SamplingRow(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0), [], []) for i in range(6)]
    tokens = Sampler("cpu")(logits, rows).token_ids
    assert [tokens[i] for i in (0, 2, 4)] == logits.argmax(-1)[[0, 2, 4]].tolist()


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(VOCAB, generator=gen)
    params = SamplingParams(temperature=1.0, seed=1234)

    def draw_sequence(batch_size: int, position: int, others_seeded: bool) -> list[int]:
        sampler = Sampler("cpu")
        tokens = []
        for _ in range(20):
            logits = torch.randn(batch_size, VOCAB, generator=gen)
            logits[position] = target
            rows = [SamplingRow(SamplingParams(temperature=1.3, seed=i if others_seeded else None), [], [],
                                generator=sampler.generator(100 + i, i if others_seeded else None))
                    for i in range(batch_size)]
            rows[position] = SamplingRow(params, [], [], generator=sampler.generator(0, params.seed))
            tokens.append(sampler(logits, rows).token_ids[position])
        return tokens

    alone = draw_sequence(1, 0, False)
    assert len(set(alone)) > 1  # it really samples
    assert draw_sequence(7, 3, False) == alone
    assert draw_sequence(4, 0, True) == alone
    assert draw_sequence(9, 8, True) == alone


def test_repetition_presence_and_frequency_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0] + [0.0] * (VOCAB - 6)])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    row = SamplingRow(params, output_token_ids=[3, 3, 1], prompt_token_ids=[0, 4])
    processed = Sampler("cpu")._process(logits, [row])[0]
    expected = logits[0].clone()
    for token in (0, 1, 3, 4):  # seen anywhere: divide positives, multiply negatives
        expected[token] = expected[token] / 1.5 if expected[token] > 0 else expected[token] * 1.5
    expected[3] -= 0.5 + 2 * 0.25  # output tokens only
    expected[1] -= 0.5 + 1 * 0.25
    assert torch.allclose(processed, expected)


def test_logit_bias_and_blocked_tokens():
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = 5.0
    rows = [SamplingRow(SamplingParams(temperature=0.0, logit_bias={7: 10.0}), [], []),
            SamplingRow(SamplingParams(temperature=0.0), [], [], blocked_token_ids=[0])]
    out = Sampler("cpu")(logits, rows)
    assert out.token_ids[0] == 7
    assert out.token_ids[1] != 0


def test_logprobs_are_the_raw_log_softmax_with_top_alternatives():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    rows = [SamplingRow(SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.3), [1], [2]),
            SamplingRow(SamplingParams(temperature=0.0), [], []),
            SamplingRow(SamplingParams(temperature=0.0, logprobs=0), [], [])]
    out = Sampler("cpu")(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(float(reference[0, first.token_id]), abs=1e-6)
    top = torch.topk(reference[0], 3)
    assert list(first.top) == top.indices.tolist()
    assert list(first.top.values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[1] is None
    assert out.logprobs[2].top == {} and out.logprobs[2].logprob == pytest.approx(
        float(reference[2].max()), abs=1e-6)


def test_a_given_argmax_serves_greedy_rows_only_where_nothing_changes_the_logits():
    # the fused decode step hands its argmax over; a stale one here shows where it is (not) used
    logits = probs_to_logits(PROBS).expand(2, -1).contiguous()
    stale = [5, 6]
    greedy = SamplingParams(temperature=0.0)
    assert Sampler("cpu")(logits, [SamplingRow(greedy, [], [])] * 2, stale).token_ids == stale
    assert Sampler("cpu")(logits, [SamplingRow(greedy, [], [])] * 2).token_ids == [0, 0]
    biased = SamplingParams(temperature=0.0, logit_bias={3: 100.0})
    assert Sampler("cpu")(logits, [SamplingRow(biased, [], [])] * 2, stale).token_ids == [3, 3]
    mixed = [SamplingRow(greedy, [], []), SamplingRow(SamplingParams(temperature=1.0, top_k=1), [], [])]
    assert Sampler("cpu")(logits, mixed, stale).token_ids == [0, 0]
