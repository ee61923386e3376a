"""Engine test fixtures: one tiny fp32 model per session, an engine factory, the reference loop.

Every engine made by `make_engine` is checked after its test: no request left, every KV block
free (reference count 0), so a leaked block fails the test that leaked it.
"""

from __future__ import annotations

import pytest
import torch

from zili.engine.llm_engine import LLMEngine, resolve_eos_token_ids
from zili.generation import generate_tokens
from zili.models.generation_config import GenerationDefaults
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.sampling_params import SamplingParams


class TinyModel:
    def __init__(self, folder):
        self.folder = folder
        self.model, self.config = load_model(folder, device="cpu", dtype=torch.float32)
        self.tokenizer = Tokenizer.from_folder(folder)
        self.eos_token_ids = resolve_eos_token_ids(self.tokenizer, GenerationDefaults.from_folder(folder),
                                                   self.config)

    def reference(self, prompt_ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
        """Token ids from the reference loop (zili.generation.generate_tokens), the oracle."""
        return [step.token_id for step in generate_tokens(self.model, prompt_ids, params, self.eos_token_ids,
                                                          max_model_len)]


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint) -> TinyModel:
    return TinyModel(tiny_checkpoint)


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.requests, f"requests left in the engine: {list(engine.requests)}"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_used_blocks} KV blocks leaked"
    assert all(count == 0 for count in bm.ref_counts)


@pytest.fixture
def make_engine(tiny):
    engines: list[LLMEngine] = []

    def factory(**options) -> LLMEngine:
        options.setdefault("num_blocks", 256)
        engine = LLMEngine(tiny.model, tiny.config, tiny.tokenizer, tiny.eos_token_ids, **options)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        assert_all_blocks_free(engine)


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      ids: list[str] | None = None) -> list:
    """Add every prompt, step until all finish; returns the final RequestOutputs in order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params_list):
        engine.add_request(request_id, prompt, p)
    final = {}
    for _ in range(10_000):
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
        if len(final) == len(ids):
            return [final[i] for i in ids]
    raise AssertionError("the engine did not finish")
