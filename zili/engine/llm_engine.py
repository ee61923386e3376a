"""LLMEngine: requests in, RequestOutput snapshots out, one `step()` at a time.

What belongs here: request admission and validation, the step loop (schedule -> execute ->
sample -> update), finishing and aborting requests, and engine metrics. Scheduling policy,
block bookkeeping, tensors, sampling and detokenization live in their own modules.

Not thread-safe: one thread drives an engine (see `AsyncLLMEngine` for the server).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from zili.config import EngineConfig, ModelConfig
from zili.engine.block_manager import BlockManager
from zili.engine.metrics import EngineMetrics
from zili.engine.model_runner import ModelOutput, ModelRunner
from zili.engine.output_processor import OutputProcessor
from zili.engine.planning import plan_engine
from zili.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from zili.engine.sequence import Request, Sequence
from zili.errors import InvalidRequestError, ZiliError
from zili.layers.sampler import Sampler, SamplerOutput, SamplingRow
from zili.models.generation_config import GenerationDefaults
from zili.models.tokenizer import Tokenizer
from zili.outputs import Logprob, RequestOutput
from zili.sampling_params import SamplingParams


class EngineStepError(ZiliError):
    """A step failed for `request_ids` (the whole batch when the model failed, or the requests whose
    output processing failed); `outputs` holds the snapshots of the requests that progressed fine."""

    def __init__(self, request_ids: list[str], cause: BaseException, outputs: list[RequestOutput] | None = None):
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.outputs = outputs or []


def resolve_eos_token_ids(tokenizer: Tokenizer, defaults: GenerationDefaults, config: ModelConfig) -> list[int]:
    """generation_config.json's EOS ids, else config.json's, else the tokenizer's EOS token."""
    ids = list(defaults.eos_token_ids) or list(config.eos_token_id)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(self, model: nn.Module, model_config: ModelConfig, tokenizer: Tokenizer,
                 eos_token_ids: list[int], engine_config: EngineConfig | None = None, **options):
        if engine_config is not None and options:
            raise TypeError("pass either an EngineConfig or keyword options, not both")
        self.config = engine_config or EngineConfig.from_options(**options)
        self.model, self.model_config, self.tokenizer = model, model_config, tokenizer
        self.eos_token_ids = list(eos_token_ids)
        weights = next(p for p in model.parameters() if p.is_floating_point())
        self.plan = plan_engine(self.config, model_config, weights.dtype, weights.device)
        self.max_model_len = self.plan.max_model_len
        self.block_manager = BlockManager(self.plan.num_blocks, self.plan.block_size,
                                          self.config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.plan.scheduler, self.block_manager)
        self.runner = ModelRunner(model, model_config, self.plan.num_blocks, self.plan.block_size,
                                  self.plan.kv_cache_dtype)
        self.sampler = Sampler(weights.device)
        self.output_processor = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.fault_hook: Callable[[Sequence], None] | None = None
        """Test hook, called with every scheduled sequence before the model runs; raising fails the batch."""
        self._request_counter = itertools.count()
        self._counters = dict(prompt_tokens=0, generation_tokens=0, finished=0, aborted=0)

    @classmethod
    def from_folder(cls, path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                    progress: bool = False, **options) -> "LLMEngine":
        from zili.models.loader import load_model

        model, config = load_model(path, device=device, dtype=dtype, progress=progress)
        tokenizer = Tokenizer.from_folder(path)
        eos = resolve_eos_token_ids(tokenizer, GenerationDefaults.from_folder(path), config)
        return cls(model, config, tokenizer, eos, **options)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ---- requests -------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams,
                      strict_max_tokens: bool = False) -> None:
        """Raise InvalidRequestError unless the request can run. Pure: safe from any thread.

        With `strict_max_tokens`, prompt + max_tokens must fit max_model_len (the OpenAI API's
        rule); otherwise generation just ends with "length" at max_model_len.
        """
        num_prompt, limit, vocab = len(prompt_token_ids), self.max_model_len, self.model_config.vocab_size
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if num_prompt >= limit:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens but this model's maximum context length is {limit} "
                f"tokens, leaving no room to generate", param="prompt")
        if strict_max_tokens and params.max_tokens is not None and num_prompt + params.max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but {num_prompt + params.max_tokens} were "
                f"requested ({num_prompt} in the prompt, {params.max_tokens} in max_tokens)", param="max_tokens")
        if params.n > self.plan.scheduler.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds this engine's max_num_seqs "
                                      f"({self.plan.scheduler.max_num_seqs})", param="n")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(f"logit_bias token ids must be < {vocab}", param="logit_bias")

    def add_request(self, request_id: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, strict_max_tokens: bool = False) -> Request:
        if request_id is None:
            request_id = f"request-{next(self._request_counter)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        self.check_request(prompt_token_ids, params, strict_max_tokens)
        request = Request.create(request_id, prompt_token_ids, params, prompt, self.plan.block_size)
        self.scheduler.add_request(request)
        self.requests[request_id] = request
        self._counters["prompt_tokens"] += len(prompt_token_ids)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final snapshot (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                seq.finish_reason = "abort"
        for seq in request.sequences:
            self._release(seq)
        request.finished_time = time.monotonic()
        self._counters["aborted"] += 1
        return self.output_processor.snapshot(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule -> execute -> sample -> update. Returns a snapshot of each request that progressed."""
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return []
        count = self._greedy_steps(batch)
        try:
            for chunk in batch.chunks:
                if self.fault_hook is not None:
                    self.fault_hook(chunk.seq)
            if count > 1:
                tokens = self.runner.execute_greedy_steps(
                    batch, count, [self.output_processor.stop_token_ids(c.seq) for c in batch.chunks])
            else:
                model_output = self.runner.execute(batch)
                sampled = self.sampler(model_output.sample_logits,
                                       [self._sampling_row(s) for s in model_output.sample_seqs],
                                       model_output.sample_argmax)
        except Exception as error:
            raise EngineStepError(batch.request_ids, error) from error
        if count > 1:
            return self._process_steps(batch, tokens)
        self.scheduler.update(batch)
        self._record_prompt_logprobs(model_output)
        self._counters["generation_tokens"] += len(sampled.token_ids)
        return self._process_samples(model_output.sample_seqs, sampled)

    def _greedy_steps(self, batch: SchedulerOutput) -> int:
        """How many decode steps this batch runs in one fused call (num_scheduler_steps), 1 unless every
        chunk is a decode of a plain greedy sequence (no logprobs, penalties, bias or pending min_tokens)
        that already has its first token (a prompt's last token is a step of its own: the first token is
        not held back for a group), with that many tokens left before max_tokens and max_model_len, the
        fused step takes the batch, and the blocks for them are free: then they are allocated here."""
        count = self.config.scheduler.num_scheduler_steps
        fused = self.runner.fused
        if count <= 1 or fused is None or len(batch.chunks) > fused.max_batch:
            return 1
        for chunk in batch.chunks:
            seq, params = chunk.seq, chunk.seq.params
            if (chunk.num_tokens != 1 or not chunk.samples or seq.num_output_tokens < 1 or not params.greedy
                    or params.logprobs is not None or params.logit_bias or params.penalized
                    or seq.num_output_tokens < params.min_tokens):
                return 1
            if params.max_tokens is not None:
                count = min(count, params.max_tokens - seq.num_output_tokens)
            count = min(count, self.max_model_len - seq.num_tokens)
        manager = self.block_manager
        needed = sum(max(0, manager.blocks_needed(c.seq.num_computed_tokens + count) - len(c.seq.block_table))
                     for c in batch.chunks)
        if (count <= 1 or needed > manager.num_free_blocks
                or not fused.takes_steps(max(c.start for c in batch.chunks) + count)):
            return 1
        for chunk in batch.chunks:
            if not manager.allocate(chunk.seq, count):  # cannot happen: the total was checked above
                raise RuntimeError("KV blocks for a group of steps ran out after they were counted")
        return count

    def _process_steps(self, batch: SchedulerOutput, tokens: list[list[int]]) -> list[RequestOutput]:
        """Several greedy steps' tokens: append each sequence's in order until it finishes (the rest are
        dropped, as is what the model computed for them: the group itself ended at the first stop token, so
        only a stop string can end a sequence inside it), advance the computed counts, then finish."""
        progressed, failed, finished, appended = self._append_rows(
            [c.seq for c in batch.chunks], [[(token_id, None) for token_id in row] for row in tokens])
        self._counters["generation_tokens"] += appended
        # every position that fed a kept token is computed (the last new token is not)
        self.scheduler.update(SchedulerOutput([ScheduledChunk(c.seq, c.start, len(c.seq.token_ids) - 1 - c.start, True)
                                               for c in batch.chunks]))
        for seq in finished:
            self._finish(seq)
        return self._snapshots(progressed, failed)

    def _process_samples(self, seqs: list[Sequence], sampled: SamplerOutput) -> list[RequestOutput]:
        """Append each sampled token (detokenize, check stops, finish)."""
        progressed, failed, finished, _ = self._append_rows(
            seqs, [[(token_id, logprob)] for token_id, logprob in zip(sampled.token_ids, sampled.logprobs)])
        for seq in finished:
            self._finish(seq)
        return self._snapshots(progressed, failed)

    def _append_rows(self, seqs: list[Sequence], rows: list[list[tuple[int, Logprob | None]]]
                     ) -> tuple[dict[str, Request], dict[str, Exception], list[Sequence], int]:
        """Append each sequence's row of (token id, logprob) in order until the sequence finishes (the rest of
        the row is dropped). A request whose output processing fails (a poison request) fails alone: its other
        sequences are skipped. Returns the requests that progressed, those that failed, the sequences that
        finished, and the number of tokens appended."""
        progressed: dict[str, Request] = {}
        failed: dict[str, Exception] = {}
        finished: list[Sequence] = []
        appended = 0
        for seq, row in zip(seqs, rows):
            request_id = seq.request.request_id
            if request_id in failed:
                continue
            try:
                for token_id, logprob in row:
                    done = self.output_processor.append_token(seq, token_id, logprob)
                    appended += 1
                    if done:
                        finished.append(seq)
                        break
            except Exception as error:  # noqa: BLE001 - isolate the request, keep the batch
                failed[request_id] = error
                continue
            progressed[request_id] = seq.request
        return progressed, failed, finished, appended

    def _snapshots(self, progressed: dict[str, Request], failed: dict[str, Exception]) -> list[RequestOutput]:
        """The progressed requests' snapshots; with failures, raised inside EngineStepError (which carries
        them) for the failed requests."""
        outputs = [self.output_processor.snapshot(r) for i, r in progressed.items() if i not in failed]
        if failed:
            raise EngineStepError(list(failed), next(iter(failed.values())), outputs)
        return outputs

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        blocked = self.output_processor.stop_token_ids(seq) if seq.num_output_tokens < params.min_tokens else []
        return SamplingRow(params, seq.output_token_ids if params.penalized else [],
                           seq.prompt_token_ids if params.penalized else [], blocked,
                           self.sampler.generator(seq.seq_id, seq.seed))

    def _record_prompt_logprobs(self, output: ModelOutput) -> None:
        if not output.prompt_rows:
            return
        targets = [token for _, _, token in output.prompt_rows]
        num_top = [request.params.prompt_logprobs for request, _, _ in output.prompt_rows]
        for (request, position, _), logprob in zip(output.prompt_rows,
                                                   self.sampler.prompt_logprobs(output.prompt_logits, targets, num_top)):
            if len(request.prompt_logprobs) == position + 1:
                request.prompt_logprobs.append(logprob)

    def _finish(self, seq: Sequence) -> None:
        self._release(seq)
        request = seq.request
        if request.is_finished and request.request_id in self.requests:
            request.finished_time = time.monotonic()
            del self.requests[request.request_id]
            self._counters["finished"] += 1

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.sampler.forget(seq.seq_id)

    # ---- metrics --------------------------------------------------------------------------

    def metrics(self) -> EngineMetrics:
        bm, counters = self.block_manager, self._counters
        return EngineMetrics(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=bm.num_used_blocks, kv_blocks_free=bm.num_free_blocks, kv_blocks_total=bm.num_blocks,
            kv_block_size=bm.block_size, prefix_cache_queries=bm.prefix_queries_tokens,
            prefix_cache_hits=bm.prefix_hits_tokens, prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_total=counters["prompt_tokens"],
            generation_tokens_total=counters["generation_tokens"], num_requests_finished=counters["finished"],
            num_requests_aborted=counters["aborted"])
