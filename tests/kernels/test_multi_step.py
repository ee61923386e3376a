"""Multi-step greedy decoding (num_scheduler_steps): several fused decode steps per engine step.

Oracle: the same engine at num_scheduler_steps=1, which samples every token in Python. Greedy
decoding is deterministic, so every request must end with the same token ids, text, finish and stop
reasons whatever the number of steps per call; stops that fall inside a group of steps must cut
the group there. A spy on the fused decoder checks that the groups really ran, and a prefix-cache
hit on blocks that were filled during groups checks what they hold.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from tiny_models import make_checkpoint

from zili.config import ConfigError, EngineConfig
from zili.engine.fused_decode import FusedDecoder
from zili.engine.llm_engine import LLMEngine
from zili.sampling_params import SamplingParams

PROMPTS = [[5 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate([3, 9, 17, 30, 1])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("multi-step"), "Qwen2ForCausalLM", weight_std=0.1,
                           dtype=torch.bfloat16)


class GroupCall(NamedTuple):
    count: int                   # steps asked for
    stop_ids: list[list[int]]    # each row's stop tokens
    rows: list[list[int]]        # each row's tokens from the steps that ran


@pytest.fixture
def group_calls(monkeypatch) -> list[GroupCall]:
    """Every fused call that ran several steps."""
    calls: list[GroupCall] = []
    original = FusedDecoder.greedy_steps

    def spy(self, input_ids, positions, block_tables, count, stop_ids):
        rows = original(self, input_ids, positions, block_tables, count, stop_ids)
        calls.append(GroupCall(count, stop_ids, rows))
        return rows

    monkeypatch.setattr(FusedDecoder, "greedy_steps", spy)
    return calls


def generate(folder, steps: int, prompts, params, **options) -> dict[str, tuple]:
    engine = LLMEngine.from_folder(folder, dtype="bfloat16", num_scheduler_steps=steps, block_size=4, **options)
    assert engine.runner.fused is not None, "the fused decoder does not take the test model"
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done = output.outputs[0]
                finals[output.request_id] = (done.token_ids, done.text, done.finish_reason, done.stop_reason)
    assert engine.block_manager.num_used_blocks == 0, "blocks leaked"
    return finals


@pytest.mark.parametrize("steps", [2, 5, 8])
def test_groups_of_greedy_steps_give_the_single_steps_tokens(folder, cpu_kernels, group_calls, steps):
    params = SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True)  # 23: no multiple of the group
    expected = generate(folder, 1, PROMPTS, params)
    assert not group_calls
    assert generate(folder, steps, PROMPTS, params) == expected
    counts = [call.count for call in group_calls]
    assert counts and max(counts) == steps and min(counts) >= 2
    assert all(len(row) == call.count for call in group_calls for row in call.rows)  # no stop token: every step runs


def test_stops_inside_a_group_end_the_request_where_single_steps_do(folder, cpu_kernels, group_calls):
    free = generate(folder, 1, PROMPTS, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    params = []
    for i in range(len(PROMPTS)):
        ids, text = free[f"r{i}"][0], free[f"r{i}"][1]
        if i % 2:  # a token id first met at some place inside a group
            params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[ids[6 + i]]))
        else:  # a piece of text from the middle of the output
            piece = text[len(text) // 3:len(text) // 3 + 3]
            params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                         stop=[piece] if piece.strip() else []))
    expected = generate(folder, 1, PROMPTS, params)
    assert any(reason == "stop" for _, _, reason, _ in expected.values())
    assert generate(folder, 8, PROMPTS, params) == expected
    assert group_calls


def test_a_group_ends_at_the_first_stop_token_of_any_row(folder, cpu_kernels, group_calls):
    free = generate(folder, 1, PROMPTS, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    # row 1 stops on a token first met 9 or more tokens in (inside a later group of 8); the others run on
    ids = free["r1"][0]
    at = next(j for j in range(9, len(ids)) if ids[j] not in ids[:j])
    stop = ids[at]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                             stop_token_ids=[stop] if i == 1 else []) for i in range(len(PROMPTS))]
    expected = generate(folder, 1, PROMPTS, params)
    assert expected["r1"][2] == "stop" and len(expected["r1"][0]) == at + 1
    assert generate(folder, 8, PROMPTS, params) == expected
    ended = 0
    for call in group_calls:
        steps = {len(row) for row in call.rows}
        assert len(steps) == 1 and 1 <= steps.pop() <= call.count  # every row ran the same steps
        hits = [next((j for j, token in enumerate(row) if token in stops), None)
                for row, stops in zip(call.rows, call.stop_ids)]
        first = min((j for j in hits if j is not None), default=None)
        if first is None:
            assert all(len(row) == call.count for row in call.rows)
        else:  # the group's last step is the first that produced a stop token
            assert all(len(row) == first + 1 for row in call.rows)
            ended += first + 1 < call.count
    assert ended >= 1, "no group ended early"


def test_groups_stop_at_max_model_len_and_with_eos(folder, cpu_kernels, group_calls):
    params = SamplingParams(temperature=0.0, max_tokens=None)  # EOS allowed; else until max_model_len
    expected = generate(folder, 1, PROMPTS, params, max_model_len=45)
    assert generate(folder, 8, PROMPTS, params, max_model_len=45) == expected
    assert all(len(PROMPTS[int(k[1:])]) + len(v[0]) <= 45 for k, v in expected.items())
    assert group_calls


def test_a_batch_with_a_sampled_or_logprob_request_runs_single_steps(folder, cpu_kernels, group_calls):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    others = [SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, min_tokens=12)]
    for other in others:
        params = [greedy, other]
        expected = generate(folder, 1, PROMPTS[:2], params)
        group_calls.clear()
        assert generate(folder, 8, PROMPTS[:2], params) == expected
        assert not group_calls, f"{other} ran in groups"


def test_blocks_filled_during_groups_serve_later_prefix_hits(folder, cpu_kernels):
    engine = LLMEngine.from_folder(folder, dtype="bfloat16", num_scheduler_steps=8, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("first", PROMPTS[2], params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            first = output.outputs[0].token_ids
    # a prompt that repeats the first request's prompt and 20 of its tokens: whole blocks of it come
    # from the cache (written during groups), and greedy decoding must continue exactly as before
    hits_before = engine.block_manager.prefix_hits_tokens
    engine.add_request("second", PROMPTS[2] + first[:20], SamplingParams(temperature=0.0, max_tokens=10,
                                                                         ignore_eos=True))
    while engine.has_unfinished_requests():
        for output in engine.step():
            second = output.outputs[0].token_ids
    assert engine.block_manager.prefix_hits_tokens - hits_before >= 32
    assert second == first[20:30]


def test_num_scheduler_steps_must_be_a_small_positive_integer():
    for bad in (0, -1, 65, 2.0, True):
        with pytest.raises(ConfigError, match="num_scheduler_steps"):
            EngineConfig.from_options(num_scheduler_steps=bad)
    assert EngineConfig.from_options(num_scheduler_steps=8).scheduler.num_scheduler_steps == 8


def test_the_first_token_is_a_step_of_its_own(folder, cpu_kernels):
    # a one-token prompt is a single-token chunk too: its first token must not wait for a group
    engine = LLMEngine.from_folder(folder, dtype="bfloat16", num_scheduler_steps=8, block_size=4)
    engine.add_request("one", [7], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    first = engine.step()
    assert len(first[0].outputs[0].token_ids) == 1
    assert len(engine.step()[0].outputs[0].token_ids) == 9  # then a group


def test_a_batch_the_fused_step_cannot_take_reserves_no_blocks_ahead(folder, cpu_kernels, group_calls):
    engine = LLMEngine.from_folder(folder, dtype="bfloat16", num_scheduler_steps=8, block_size=4)
    engine.runner.fused.max_batch = 2  # three sequences: every step is single
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    manager = engine.block_manager
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:  # blocks for the tokens so far, none for tokens ahead
            assert len(seq.block_table) <= manager.blocks_needed(seq.num_tokens)
    assert not group_calls
