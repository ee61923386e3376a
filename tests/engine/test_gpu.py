"""GPU tier: the engine on an accelerator (CUDA, XPU, ...) gives the reference loop's tokens there.

Skipped where zili.devices.best_device() is the CPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_to_completion
from test_llm_engine import random_prompts
from test_paged_attention import MIXED, run_batch
from zili.devices import best_device
from zili.engine.llm_engine import LLMEngine
from zili.generation import generate_tokens
from zili.models.loader import load_model
from zili.sampling_params import SamplingParams

DEVICE = best_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cpu", reason="no GPU / accelerator here")]


def test_engine_on_the_accelerator_matches_the_reference_loop(tiny, tiny_checkpoint):
    model, config = load_model(tiny_checkpoint, device=DEVICE, dtype=torch.float32)
    engine = LLMEngine(model, config, tiny.tokenizer, tiny.eos_token_ids, block_size=4, num_blocks=24,
                       max_num_batched_tokens=16)
    prompts = random_prompts([3, 17, 40, 9], seed=30)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = run_to_completion(engine, prompts, params)
    assert engine.metrics().num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        expected = [s.token_id for s in generate_tokens(model, prompt, params, tiny.eos_token_ids,
                                                        engine.max_model_len)]
        assert output.token_ids == expected
    assert engine.block_manager.num_used_blocks == 0
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=8)
    first = run_to_completion(engine, [prompts[0]], seeded)[0].token_ids
    assert run_to_completion(engine, prompts, seeded)[0].token_ids == first


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_on_the_accelerator_matches_the_dense_oracle(window):
    assert max(run_batch(MIXED, 4, 2, window, device=DEVICE)) < 1e-4
