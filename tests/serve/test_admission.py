"""Bounded admission with a slow fake engine (RELIABILITY item 7).

max_running=2 and max_queued=4: of 20 concurrent requests exactly 6 are admitted, the other 14
get 503 + Retry-After at once; a request queued past the queue timeout gets 503 too.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fake_engine import AppServer, SlowFakeEngine
from tiny_models import tokenizer_vocab_size

BODY = {"model": "m", "prompt": "hi", "max_tokens": 2}


async def _post(client: httpx.AsyncClient, stream: bool) -> httpx.Response:
    body = {**BODY, "stream": stream}
    response = await client.post("/v1/completions", json=body)
    await response.aread()
    return response


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True])
def test_twenty_requests_against_two_running_four_queued(serve_model, stream):
    engine = SlowFakeEngine(tokenizer_vocab_size())
    with AppServer(serve_model, engine, served_model_names=["m"], max_num_seqs=2, max_queue=4,
                   queue_timeout_s=120) as server:

        async def scenario():
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                tasks = [asyncio.create_task(_post(client, stream)) for _ in range(20)]
                rejected = []
                for next_done in asyncio.as_completed(tasks):
                    rejected.append(await next_done)
                    if len(rejected) == 14:
                        break
                pending = [t for t in tasks if not t.done()]
                admission = server.state.admission
                counts = (len(pending), admission.num_running, admission.num_queued, engine.started)
                engine.open_gate()
                admitted = await asyncio.gather(*pending)
                return rejected, admitted, counts

        rejected, admitted, counts = asyncio.run(scenario())
    assert counts == (6, 2, 4, 2)  # 6 held: 2 in the engine, 4 queued
    for response in rejected:
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "server_overloaded"
    assert [r.status_code for r in admitted] == [200] * 6
    if stream:
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in admitted)
    assert server.state.admission.num_running == 0 and server.state.admission.num_queued == 0


@pytest.mark.timeout(120)
def test_queue_timeout_gives_503(serve_model):
    engine = SlowFakeEngine(tokenizer_vocab_size())
    with AppServer(serve_model, engine, served_model_names=["m"], max_num_seqs=1, max_queue=2,
                   queue_timeout_s=0.3) as server:

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                holder = asyncio.create_task(_post(client, False))
                assert await asyncio.to_thread(engine.first_started.wait, 60)  # the holder has the slot
                waiters = [asyncio.create_task(_post(client, False)) for _ in range(2)]
                timed_out = await asyncio.gather(*waiters)
                engine.open_gate()
                return await holder, timed_out

        holder, timed_out = asyncio.run(scenario())
    assert holder.status_code == 200
    for response in timed_out:
        assert response.status_code == 503 and "retry-after" in response.headers
        assert "queue" in response.json()["error"]["message"]


def test_a_slot_handed_to_a_leaving_waiter_is_passed_on():
    """Regression: a waiter cancelled in the same loop turn its slot arrives must not keep it."""
    from zili.serve.limits import AdmissionController

    async def scenario():
        admission = AdmissionController(max_running=1, max_queued=2, queue_timeout_s=60)
        first = await admission.acquire()
        leaving = asyncio.create_task(admission.acquire())
        staying = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0)  # both are queued now
        first.release()  # hands the slot to `leaving`...
        leaving.cancel()  # ...whose client goes away before it runs again
        await asyncio.gather(leaving, return_exceptions=True)
        ticket = await staying  # the slot moved on
        counts = (admission.num_running, admission.num_queued)
        ticket.release()
        return counts, (admission.num_running, admission.num_queued)

    during, after = asyncio.run(scenario())
    assert during == (1, 0) and after == (0, 0)
