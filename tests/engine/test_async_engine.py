"""AsyncLLMEngine: concurrent streams, abort on disconnect, per-batch failures, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from test_llm_engine import random_prompts
from zili.engine.async_engine import AsyncLLMEngine, EngineDeadError
from zili.engine.llm_engine import EngineStepError
from zili.errors import InvalidRequestError
from zili.sampling_params import SamplingParams


async def collect(engine: AsyncLLMEngine, request_id: str, prompt, params) -> list:
    return [snapshot async for snapshot in engine.generate(request_id, prompt, params)]


def test_concurrent_streams_match_the_reference_and_are_cumulative(tiny, make_engine):
    engine = AsyncLLMEngine(make_engine(block_size=4))
    prompts = random_prompts([4, 11, 23, 2], seed=20)
    params = SamplingParams(temperature=0.0, max_tokens=9)

    async def main():
        streams = await asyncio.gather(*(collect(engine, f"c{i}", p, params) for i, p in enumerate(prompts)))
        await engine.shutdown()
        return streams

    for prompt, snapshots in zip(prompts, asyncio.run(main())):
        assert snapshots[-1].finished and not any(s.finished for s in snapshots[:-1])
        assert snapshots[-1].token_ids == tiny.reference(prompt, params, engine.engine.max_model_len)
        for before, after in zip(snapshots, snapshots[1:]):
            assert after.token_ids[:len(before.token_ids)] == before.token_ids
        assert snapshots[-1].metrics.ttft_s is not None
    assert engine.metrics().num_requests_finished == 4


def test_a_consumer_that_leaves_aborts_its_request(make_engine):
    engine = AsyncLLMEngine(make_engine(block_size=4))
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=3)

    async def main():
        stream = engine.generate("leaver", [1, 2, 3], long)
        async for snapshot in stream:
            if len(snapshot.token_ids) >= 2:
                break
        await stream.aclose()  # what a server does when the client disconnects

        async def consume():
            async for _ in engine.generate("cancelled", [4, 5, 6], long):
                started.set()

        started = asyncio.Event()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # commands are handled in order before each step: once this finishes, both aborts are done
        await collect(engine, "after", [7, 8], short)
        await engine.shutdown()

    asyncio.run(main())
    metrics = engine.metrics()
    assert metrics.num_requests_aborted == 2 and metrics.num_requests_finished == 1
    assert metrics.kv_blocks_used == 0 and not engine.engine.requests


def test_abort_by_id_ends_the_stream_with_finish_reason_abort(make_engine):
    engine = AsyncLLMEngine(make_engine(block_size=4))

    async def main():
        snapshots = []
        async for snapshot in engine.generate("x", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)):
            snapshots.append(snapshot)
            if len(snapshots) == 2:
                engine.abort("x")
                engine.abort("x")  # idempotent
        await engine.shutdown()
        return snapshots

    snapshots = asyncio.run(main())
    assert snapshots[-1].finished and snapshots[-1].outputs[0].finish_reason == "abort"
    assert len(snapshots[-1].token_ids) < 200


def test_invalid_requests_raise_with_the_parameter_named(make_engine):
    engine = AsyncLLMEngine(make_engine(max_model_len=64))

    async def main():
        with pytest.raises(InvalidRequestError) as error:
            await collect(engine, "a", list(range(64)), SamplingParams())
        assert error.value.param == "prompt"
        with pytest.raises(InvalidRequestError) as error:
            await collect(engine, "b", list(range(40)), SamplingParams(max_tokens=30))
        assert error.value.param == "max_tokens" and "70" in str(error.value) and "64" in str(error.value)
        await engine.shutdown()

    asyncio.run(main())


def test_a_failing_batch_fails_only_its_requests_and_the_loop_survives(tiny, make_engine):
    llm_engine = make_engine(block_size=4, max_num_seqs=1)  # "good" waits while "bad" runs
    engine = AsyncLLMEngine(llm_engine)

    def hook(seq):
        if seq.request.request_id == "bad" and seq.num_output_tokens == 3:
            raise RuntimeError("injected fault")

    llm_engine.fault_hook = hook
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = random_prompts([5, 7], seed=21)

    async def main():
        bad = asyncio.create_task(collect(engine, "bad", prompts[0], params))
        await asyncio.sleep(0)  # let "bad" be queued first
        good = asyncio.create_task(collect(engine, "good", prompts[1], params))
        results = await asyncio.gather(bad, good, return_exceptions=True)
        later = await collect(engine, "later", prompts[0], params)
        healthy = engine.is_healthy()
        await engine.shutdown()
        return results, later, healthy

    (bad, good), later, healthy = asyncio.run(main())
    assert isinstance(bad, EngineStepError) and "injected fault" in str(bad)
    assert good[-1].token_ids == tiny.reference(prompts[1], params, llm_engine.max_model_len)
    assert later[-1].token_ids == tiny.reference(prompts[0], params, llm_engine.max_model_len)
    assert healthy


def test_shutdown_aborts_what_is_in_flight_and_refuses_new_work(make_engine):
    engine = AsyncLLMEngine(make_engine(block_size=4))

    async def main():
        snapshots = []
        async for snapshot in engine.generate("x", [1, 2], SamplingParams(max_tokens=200, ignore_eos=True)):
            snapshots.append(snapshot)
            if len(snapshots) == 1:
                await engine.shutdown()
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            await collect(engine, "y", [1, 2], SamplingParams())
        return snapshots

    snapshots = asyncio.run(main())
    assert snapshots[-1].outputs[0].finish_reason == "abort"


def test_a_poison_request_fails_alone_even_inside_a_healthy_batch(tiny, make_engine, monkeypatch):
    llm_engine = make_engine(block_size=4)
    engine = AsyncLLMEngine(llm_engine)
    processor = llm_engine.output_processor
    original = processor.append_token

    def append_token(seq, token_id, logprob):  # a detokenizer that breaks on one request only
        if seq.request.request_id == "poison" and seq.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "injected")
        return original(seq, token_id, logprob)

    monkeypatch.setattr(processor, "append_token", append_token)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = random_prompts([5, 7], seed=22)

    async def main():
        results = await asyncio.gather(collect(engine, "poison", prompts[0], params),
                                       collect(engine, "good", prompts[1], params), return_exceptions=True)
        await engine.shutdown()
        return results

    poison, good = asyncio.run(main())
    assert isinstance(poison, EngineStepError) and poison.request_ids == ["poison"]
    assert good[-1].token_ids == tiny.reference(prompts[1], params, llm_engine.max_model_len)
    assert [len(s.token_ids) for s in good] == list(range(1, 7))  # no snapshot lost in the failing step
