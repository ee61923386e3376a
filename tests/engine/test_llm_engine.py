"""LLMEngine end to end on a tiny model: token-identical to the reference loop under chunked
prefill, prefix caching and preemption; batch-independence; abort; n > 1; logprobs; metrics."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import run_to_completion
from zili.engine.llm_engine import EngineStepError
from zili.errors import InvalidRequestError
from zili.layers.attention import DenseKVCache
from zili.sampling_params import SamplingParams

LENGTHS = [1, 3, 7, 16, 17, 33, 50, 70]


def random_prompts(lengths, seed=0, vocab=290):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_matches_reference(tiny, engine, prompts, outputs, params):
    for prompt, output in zip(prompts, outputs):
        assert output.token_ids == tiny.reference(prompt, params, engine.max_model_len), f"prompt of {len(prompt)}"


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompts"])
@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-cache"])
def test_greedy_batch_is_token_identical_to_the_reference_loop(tiny, make_engine, chunked, caching):
    engine = make_engine(block_size=4, enable_chunked_prefill=chunked, enable_prefix_caching=caching,
                         max_num_batched_tokens=24 if chunked else None, max_model_len=128)
    prompts = random_prompts(LENGTHS)
    prompts.append(prompts[-1][:60] + [5, 6, 7])  # shares 60 tokens with the longest prompt
    params = SamplingParams(temperature=0.0, max_tokens=12)
    outputs = run_to_completion(engine, prompts, params)
    assert_matches_reference(tiny, engine, prompts, outputs, params)
    again = run_to_completion(engine, prompts, params)  # the second pass reuses the cached prefixes
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]
    metrics = engine.metrics()
    assert (metrics.prefix_cache_hits > 0) == caching
    if caching:
        assert again[-2].metrics.num_cached_prompt_tokens == 68  # 17 whole blocks of the 70-token prompt


def test_preemption_in_a_tiny_kv_pool_keeps_outputs_identical(tiny, make_engine):
    engine = make_engine(block_size=4, num_blocks=20, max_num_batched_tokens=32, enable_prefix_caching=False)
    prompts = random_prompts([5, 9, 14, 20, 11, 6], seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outputs = run_to_completion(engine, prompts, params)
    assert engine.metrics().num_preemptions > 0
    assert_matches_reference(tiny, engine, prompts, outputs, params)


def test_preemption_with_prefix_caching_and_chunking(tiny, make_engine):
    engine = make_engine(block_size=2, num_blocks=40, max_num_batched_tokens=8)
    prompts = random_prompts([12, 3, 25, 8, 15], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outputs = run_to_completion(engine, prompts, params)
    assert engine.metrics().num_preemptions > 0
    assert_matches_reference(tiny, engine, prompts, outputs, params)


def test_needle_request_is_the_same_alone_and_anywhere_in_random_batches(tiny, make_engine):
    needle = random_prompts([21], seed=3)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=77, max_tokens=16, ignore_eos=True)
    engine = make_engine(block_size=4, max_num_batched_tokens=40)
    alone = run_to_completion(engine, [needle, needle], [greedy, seeded])
    assert alone[0].token_ids == tiny.reference(needle, greedy, engine.max_model_len)
    rng = random.Random(4)
    for trial in range(3):
        others = random_prompts([rng.randrange(1, 60) for _ in range(rng.randrange(3, 9))], seed=10 + trial)
        other_params = [SamplingParams(temperature=rng.choice([0.0, 0.8, 1.5]), max_tokens=rng.randrange(1, 20),
                                       top_k=rng.choice([0, 5])) for _ in others]
        prompts, params = others[:], other_params[:]
        for item in ((needle, greedy), (needle, seeded)):
            at = rng.randrange(len(prompts) + 1)
            prompts.insert(at, item[0])
            params.insert(at, item[1])
        ids = [f"t{trial}-{i}" for i in range(len(prompts))]
        outputs = run_to_completion(engine, prompts, params, ids)
        needles = [o for o, p in zip(outputs, params) if p is greedy or p is seeded]
        by_params = {id(p): o for o, p in zip(outputs, params) if p is greedy or p is seeded}
        assert len(needles) == 2
        assert by_params[id(greedy)].token_ids == alone[0].token_ids
        assert by_params[id(seeded)].token_ids == alone[1].token_ids


def test_abort_frees_blocks_at_once_for_running_and_waiting_requests(make_engine):
    engine = make_engine(block_size=4, max_num_seqs=1)
    prompts = random_prompts([10, 12])
    params = SamplingParams(temperature=0.0, max_tokens=50)
    engine.add_request("running", prompts[0], params)
    engine.add_request("waiting", prompts[1], params)
    engine.step()
    engine.step()
    assert engine.metrics().num_running == 1 and engine.metrics().num_waiting == 1
    assert engine.block_manager.num_used_blocks > 0
    final = engine.abort_request("running")
    assert final.finished and final.outputs[0].finish_reason == "abort" and len(final.token_ids) == 2
    assert engine.block_manager.num_used_blocks == 0
    assert engine.abort_request("waiting").outputs[0].finish_reason == "abort"
    assert engine.abort_request("waiting") is None  # idempotent
    assert engine.metrics().num_requests_aborted == 2


def test_n_completions_equal_single_requests_with_offset_seeds(tiny, make_engine):
    engine = make_engine(block_size=4)
    prompt = random_prompts([18], seed=5)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True, logprobs=1)
    engine.add_request("n3", prompt, params)
    engine.step()  # computes the shared 16 tokens
    engine.step()  # every completion computes its tail: the prompt blocks are shared
    shared = engine.requests["n3"].sequences[0].block_table[:4]
    assert all(engine.block_manager.ref_counts[b] == 3 for b in shared)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert [c.index for c in final.outputs] == [0, 1, 2]
    singles = run_to_completion(engine, [prompt] * 3, [
        SamplingParams(temperature=1.0, seed=11 + i, max_tokens=10, ignore_eos=True) for i in range(3)])
    assert [c.token_ids for c in final.outputs] == [s.token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    greedy = run_to_completion(engine, [prompt], SamplingParams(n=2, temperature=0.0, max_tokens=8))[0]
    expected = tiny.reference(prompt, SamplingParams(temperature=0.0, max_tokens=8), engine.max_model_len)
    assert [c.token_ids for c in greedy.outputs] == [expected, expected]


def dense_logprobs(tiny, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position, computed densely (the oracle)."""
    config = tiny.config
    cache = DenseKVCache(config.num_hidden_layers, len(token_ids), config.num_key_value_heads, config.head_dim,
                         torch.float32, "cpu")
    with torch.inference_mode():
        hidden = tiny.model(torch.tensor(token_ids), torch.arange(len(token_ids)), cache)
        return torch.log_softmax(tiny.model.compute_logits(hidden), dim=-1)


def test_logprobs_and_prompt_logprobs_equal_the_models_log_softmax(tiny, make_engine):
    engine = make_engine(block_size=4, max_num_batched_tokens=8)  # the prompt is computed in chunks
    prompt = random_prompts([19], seed=6)[0]
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    output = run_to_completion(engine, [prompt], params)[0]
    full = prompt + output.token_ids
    reference = dense_logprobs(tiny, full)
    assert len(output.outputs[0].logprobs) == 6
    for i, entry in enumerate(output.outputs[0].logprobs):
        row = reference[len(prompt) - 1 + i]
        assert entry.token_id == full[len(prompt) + i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert list(entry.top) == torch.topk(row, 2).indices.tolist()
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
        row = reference[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(float(row[prompt[position]]), abs=1e-4)
        assert list(entry.top.values()) == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)


def test_stop_token_ids_min_tokens_and_max_model_len(tiny, make_engine):
    engine = make_engine(block_size=4, max_model_len=40)
    prompt = random_prompts([10], seed=7)[0]
    free_run = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    stop_token = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_token)
    stopped = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=20,
                                                                stop_token_ids=[stop_token]))[0]
    assert stopped.token_ids == free_run.token_ids[:first + 1]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_token
    # min_tokens masks stop tokens: the stop token cannot be among the first min_tokens tokens
    late = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=20, min_tokens=first + 2,
                                                             stop_token_ids=[stop_token]))[0]
    assert stop_token not in late.token_ids[:first + 2]
    # no max_tokens: generation runs to the context limit
    long = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert len(long.token_ids) == 30 and long.outputs[0].finish_reason == "length"


def test_request_validation_names_the_parameter(make_engine):
    engine = make_engine(max_model_len=32, max_num_seqs=4)
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("long", list(range(32)), SamplingParams())
    assert error.value.param == "prompt" and "32" in str(error.value)
    with pytest.raises(InvalidRequestError) as error:
        engine.check_request(list(range(20)), SamplingParams(max_tokens=20), strict_max_tokens=True)
    assert error.value.param == "max_tokens" and "40" in str(error.value) and "32" in str(error.value)
    for bad, param in (([], "prompt"), ([10_000], "prompt")):
        with pytest.raises(InvalidRequestError) as error:
            engine.add_request("bad", bad, SamplingParams())
        assert error.value.param == param
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("n", [1, 2], SamplingParams(n=5))
    assert error.value.param == "n"
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("bias", [1, 2], SamplingParams(logit_bias={100_000: 1.0}))
    assert error.value.param == "logit_bias"
    assert not engine.requests


def test_a_failing_step_names_its_requests_and_can_be_aborted(make_engine):
    engine = make_engine(block_size=4)
    prompts = random_prompts([5, 8])
    params = SamplingParams(temperature=0.0, max_tokens=10)
    engine.add_request("good", prompts[0], params)
    engine.add_request("bad", prompts[1], params)

    def hook(seq):
        if seq.request.request_id == "bad" and seq.num_output_tokens == 3:
            raise RuntimeError("injected")

    engine.fault_hook = hook
    with pytest.raises(EngineStepError) as error:
        for _ in range(10):
            engine.step()
    assert set(error.value.request_ids) == {"good", "bad"}
    engine.abort_request("bad")
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert final.request_id == "good" and len(final.token_ids) == 10


def test_metrics_track_the_queues_and_request_timings(make_engine):
    engine = make_engine(block_size=4, max_num_seqs=2)
    prompts = random_prompts([6, 6, 6], seed=8)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"m{i}", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()
    metrics = engine.metrics()
    assert (metrics.num_running, metrics.num_waiting) == (2, 1)
    assert metrics.kv_blocks_used == 4 and metrics.kv_blocks_total == 256
    assert metrics.prompt_tokens_total == 18 and metrics.generation_tokens_total == 2
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    timing = finals[0].metrics
    assert timing.ttft_s >= 0 and timing.tpot_s >= 0 and timing.num_generation_tokens == 4
    assert timing.num_prompt_tokens == 6 and timing.arrival_time <= timing.first_token_time <= timing.finished_time
    assert engine.metrics().generation_tokens_total == 12 and engine.metrics().num_requests_finished == 3
