"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`, on the serving engine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from zili.config import EngineConfig
from zili.engine.llm_engine import LLMEngine, resolve_eos_token_ids
from zili.models.generation_config import GenerationDefaults
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.outputs import RequestOutput
from zili.sampling_params import SamplingParams

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "zili-demo"


def default_model_path() -> Path:
    """The bundled demo model, used when no model path is given."""
    return DEMO_MODEL


class LLM:
    """A loaded model with its tokenizer and serving engine; generates for one prompt or a batch.

    Engine options (see zili.config CacheConfig / SchedulerConfig): block_size, kv_cache_memory
    (bytes or "4GiB"), kv_cache_memory_fraction, num_blocks, max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, enable_chunked_prefill, kv_cache_dtype ("auto" or "int8"), num_scheduler_steps
    (greedy decode steps per engine step, 1 by default).
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, max_model_len: int | None = None,
                 progress: bool = False, **engine_options):
        self.path = Path(model) if model is not None else default_model_path()
        engine_config = EngineConfig.from_options(max_model_len=max_model_len, **engine_options)
        self.model, self.config = load_model(self.path, device=device, dtype=dtype, progress=progress)
        self.tokenizer = Tokenizer.from_folder(self.path)
        self.generation_defaults = GenerationDefaults.from_folder(self.path)
        self.eos_token_ids = resolve_eos_token_ids(self.tokenizer, self.generation_defaults, self.config)
        self.engine = LLMEngine(self.model, self.config, self.tokenizer, self.eos_token_ids, engine_config)
        self.max_model_len = self.engine.max_model_len
        self._request_ids = itertools.count()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams seeded from the model's generation_config.json, then `overrides`."""
        defaults = self.generation_defaults
        values = {k: v for k, v in (("temperature", defaults.temperature), ("top_p", defaults.top_p),
                                    ("top_k", defaults.top_k),
                                    ("repetition_penalty", defaults.repetition_penalty)) if v is not None}
        values.update(overrides)
        return SamplingParams(**values)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def _add(self, prompt: str | list[int], params: SamplingParams, prompt_ids: list[int] | None = None) -> str:
        request_id = f"llm-{next(self._request_ids)}"
        prompt_ids = self.encode_prompt(prompt) if prompt_ids is None else prompt_ids
        self.engine.add_request(request_id, prompt_ids, params, prompt if isinstance(prompt, str) else None)
        return request_id

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are generated (whole characters only;
        never a piece of a stop string)."""
        request_id = self._add(prompt, params or self.default_sampling_params())
        sent = 0
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if output.finished:
                        return
        finally:
            self.engine.abort_request(request_id)  # no-op once finished; frees blocks if abandoned

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt in one continuous batch; returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or self.default_sampling_params()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode_prompt(p) for p in prompts]
        for prompt_ids, params in zip(encoded, sampling_params):
            self.engine.check_request(prompt_ids, params)  # fail before anything runs
        ids: list[str] = []
        finals: dict[str, RequestOutput] = {}
        try:
            for prompt, prompt_ids, params in zip(prompts, encoded, sampling_params):
                ids.append(self._add(prompt, params, prompt_ids))
            with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while len(finals) < len(ids):
                    for output in self.engine.step():
                        if output.finished:
                            finals[output.request_id] = output
                            bar.update(1)
        finally:
            for request_id in ids:
                if request_id not in finals:
                    self.engine.abort_request(request_id)
        return [finals[request_id] for request_id in ids]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> RequestOutput:
        prompt_ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.generate([prompt_ids], sampling_params, use_tqdm=use_tqdm)[0]
