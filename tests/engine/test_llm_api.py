"""zili.LLM on the serving engine: engine options, batches with per-prompt params, abandoned
streams, option errors. (tests/test_llm.py covers the API against the reference loop.)"""

from __future__ import annotations

import pytest
import torch

from zili.config import ConfigError
from zili.llm import LLM
from zili.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", dtype=torch.float32, block_size=8, kv_cache_memory="2MiB",
               max_num_seqs=4)


def test_engine_options_reach_the_engine(llm):
    plan = llm.engine.plan
    assert plan.block_size == 8 and plan.scheduler.max_num_seqs == 4
    assert plan.num_blocks == 2 * 2**20 // plan.bytes_per_block
    assert llm.max_model_len == llm.engine.max_model_len == 256


def test_more_prompts_than_max_num_seqs_all_finish_in_order(llm):
    prompts = [f"Hello {i}" for i in range(9)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts and all(o.finished for o in outputs)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_per_prompt_params_and_token_id_prompts(llm):
    ids = llm.tokenizer.encode("Hello")
    outputs = llm.generate([ids, ids], [SamplingParams(temperature=0.0, max_tokens=3),
                                        SamplingParams(temperature=0.0, max_tokens=5)], use_tqdm=False)
    assert [len(o.token_ids) for o in outputs] == [3, 5] and outputs[0].prompt is None
    assert outputs[1].token_ids[:3] == outputs[0].token_ids
    with pytest.raises(ValueError):
        llm.generate([ids, ids], [SamplingParams()], use_tqdm=False)


def test_an_abandoned_stream_frees_its_request(llm):
    stream = llm.stream("Hello world!", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    next(stream, None)
    stream.close()
    assert not llm.engine.requests and llm.engine.block_manager.num_used_blocks == 0


def test_bad_options_and_prompts_fail_before_running(tiny_checkpoint, llm):
    with pytest.raises(ConfigError):
        LLM(tiny_checkpoint, device="cpu", block_sizes=4)
    with pytest.raises(ConfigError):
        LLM(tiny_checkpoint, device="cpu", kv_cache_memory="lots")
    with pytest.raises(ConfigError):
        LLM(tiny_checkpoint, device="cpu", num_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError):
        llm.generate(["fine", "x" * 2000], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.requests
