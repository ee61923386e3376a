"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from zili.generation import find_stop, generate_tokens
from zili.models.generation_config import GenerationDefaults
from zili.models.loader import load_model
from zili.models.tokenizer import IncrementalDetokenizer, Tokenizer
from zili.outputs import CompletionOutput, RequestOutput
from zili.sampling_params import SamplingParams

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "zili-demo"


def default_model_path() -> Path:
    """The bundled demo model, used when no model path is given."""
    return DEMO_MODEL


class LLM:
    """A loaded model with its tokenizer; generates for one prompt or a batch."""

    def __init__(self, model: str | Path | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, max_model_len: int | None = None,
                 progress: bool = False):
        self.path = Path(model) if model is not None else default_model_path()
        self.model, self.config = load_model(self.path, device=device, dtype=dtype, progress=progress)
        self.tokenizer = Tokenizer.from_folder(self.path)
        self.generation_defaults = GenerationDefaults.from_folder(self.path)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.eos_token_ids = self._eos_ids()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _eos_ids(self) -> list[int]:
        ids = list(self.generation_defaults.eos_token_ids) or list(self.config.eos_token_id)
        if self.tokenizer.eos_token_id is not None and not ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

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

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are generated (whole characters only)."""
        for delta, _ in self._run(self.encode_prompt(prompt), params or self.default_sampling_params()):
            if delta:
                yield delta

    def _run(self, prompt_ids: list[int], params: SamplingParams, seed_offset: int = 0):
        """Yield (text delta, CompletionOutput so far) per token, honouring stop strings.

        With stop strings, the last len(longest stop) - 1 characters are held back until they
        can no longer start a match, so streamed text never shows a stop string.
        """
        if seed_offset and params.seed is not None:
            params = SamplingParams(**{**params.__dict__, "seed": params.seed + seed_offset})
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        output = CompletionOutput(index=seed_offset, text="", token_ids=[])
        hold = max((len(s) for s in params.stop), default=1) - 1
        for step in generate_tokens(self.model, prompt_ids, params, self.eos_token_ids, self.max_model_len):
            output.token_ids.append(step.token_id)
            if step.finish_reason != "stop":
                detok.add(step.token_id)
            if step.finish_reason:
                detok.flush()
            text = detok.text
            found = find_stop(text, params.stop, len(output.text) - hold) if params.stop else None
            if found:
                index, stop = found
                end = index + len(stop) if params.include_stop_str_in_output else index
                output.finish_reason, output.stop_reason = "stop", stop
            elif step.finish_reason:
                end = len(text)
                output.finish_reason = step.finish_reason
                output.stop_reason = step.token_id if step.finish_reason == "stop" else None
            else:
                end = max(len(output.text), len(text) - hold)
            delta, output.text = text[len(output.text):end], text[:end]
            yield delta, output
            if output.finish_reason:
                return

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt; returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.default_sampling_params()
        results = []
        for i, prompt in enumerate(tqdm(prompts, desc="generating", disable=not use_tqdm)):
            prompt_ids = self.encode_prompt(prompt)
            outputs = []
            for index in range(params.n):
                final = None
                for _, final in self._run(prompt_ids, params, seed_offset=index):
                    pass
                outputs.append(final)
            results.append(RequestOutput(str(i), prompt if isinstance(prompt, str) else None, prompt_ids,
                                         outputs, finished=True))
        return results

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        prompt_ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.generate([prompt_ids], sampling_params)[0]
