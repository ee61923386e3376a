"""Scheduler with fake requests and a fake block count: no model, no tensors.

A "step" here is schedule() -> update() -> append a fake token to every sequence that samples,
finishing sequences that reached their max_tokens, which is all the engine adds.
"""

from __future__ import annotations

from zili.config import SchedulerConfig
from zili.engine.block_manager import BlockManager
from zili.engine.scheduler import Scheduler
from zili.engine.sequence import Request, SequenceStatus
from zili.sampling_params import SamplingParams

BLOCK = 4


def make_scheduler(num_blocks=64, budget=32, max_num_seqs=8, chunked=True, caching=True,
                   max_model_len=None) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked, max_model_len=max_model_len or budget)
    return Scheduler(config, BlockManager(num_blocks, BLOCK, caching))


def add(scheduler: Scheduler, name: str, prompt_len: int, max_tokens=8, n=1, first_token=0) -> Request:
    request = Request.create(name, list(range(first_token, first_token + prompt_len)),
                             SamplingParams(max_tokens=max_tokens, n=n, seed=0 if n > 1 else None), block_size=BLOCK)
    scheduler.add_request(request)
    return request


def step(scheduler: Scheduler) -> dict[str, int]:
    """One fake engine step; returns {request_id#index: tokens scheduled}."""
    out = scheduler.schedule()
    scheduler.update(out)
    for chunk in out.chunks:
        seq = chunk.seq
        if chunk.samples:
            seq.token_ids.append(1000 + seq.num_output_tokens)
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq)
    return {f"{c.seq.request.request_id}#{c.seq.index}": c.num_tokens for c in out.chunks}


def drain(scheduler: Scheduler, limit=500) -> int:
    steps = 0
    while scheduler.has_unfinished():
        step(scheduler)
        steps += 1
        assert steps < limit, "the scheduler made no progress"
    return steps


def assert_all_free(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)


def test_fcfs_admission_within_max_num_seqs():
    s = make_scheduler(max_num_seqs=2)
    for name in "abc":
        add(s, name, 3)
    assert step(s) == {"a#0": 3, "b#0": 3}
    assert [seq.request.request_id for seq in s.waiting] == ["c"]
    assert step(s) == {"a#0": 1, "b#0": 1}
    drain(s)
    assert_all_free(s)


def test_chunked_prefill_splits_a_long_prompt_and_mixes_it_with_decodes():
    s = make_scheduler(budget=8)
    add(s, "short", 3, max_tokens=10)
    assert step(s) == {"short#0": 3}
    add(s, "long", 20)
    # the decode goes first, the long prompt takes what is left of the budget, step after step
    assert step(s) == {"short#0": 1, "long#0": 7}
    assert step(s) == {"short#0": 1, "long#0": 7}
    assert step(s) == {"short#0": 1, "long#0": 6}
    assert step(s) == {"short#0": 1, "long#0": 1}  # long now decodes
    drain(s)
    assert_all_free(s)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    s = make_scheduler(budget=24, chunked=False, max_model_len=24)
    add(s, "a", 20)
    add(s, "b", 10, first_token=100)
    assert step(s) == {"a#0": 20}  # b does not fit the remaining 4 tokens and is not split
    assert step(s) == {"a#0": 1, "b#0": 10}
    drain(s)
    assert_all_free(s)


def test_token_budget_is_never_exceeded():
    s = make_scheduler(budget=16, max_num_seqs=8)
    for i in range(6):
        add(s, f"r{i}", 5 + 3 * i, max_tokens=5)
    while s.has_unfinished():
        assert sum(step(s).values()) <= 16


def test_preemption_frees_the_newest_sequence_and_requeues_it_first():
    # 4 blocks of 4 tokens: two 7-token prompts take 2 blocks each; decoding needs a third
    s = make_scheduler(num_blocks=4, budget=64, caching=False)
    a = add(s, "a", 7, max_tokens=4)
    b = add(s, "b", 7, max_tokens=4)
    add(s, "c", 2, max_tokens=4)
    assert step(s) == {"a#0": 7, "b#0": 7}
    assert step(s) == {"a#0": 1, "b#0": 1}  # positions 7: still within block 2
    out = s.schedule()  # a needs a 3rd block: b (newest) is preempted
    assert [seq.request.request_id for seq in out.preempted] == ["b"]
    assert [c.seq.request.request_id for c in out.chunks] == ["a"]
    assert s.num_preemptions == 1
    seq_b = b.sequences[0]
    assert seq_b.status is SequenceStatus.WAITING and seq_b.block_table == [] and seq_b.num_computed_tokens == 0
    assert [seq.request.request_id for seq in s.waiting] == ["b", "c"]  # b before the newer c
    s.update(out)
    a.sequences[0].token_ids.append(5)
    drain(s)
    assert all(seq.num_output_tokens == 4 for r in (a, b) for seq in r.sequences)
    assert_all_free(s)


def test_a_step_that_preempts_admits_nobody():
    s = make_scheduler(num_blocks=4, budget=64, caching=False)
    add(s, "a", 8, max_tokens=9)
    add(s, "b", 7, max_tokens=9)
    step(s)  # a: 2 blocks, b: 2 blocks
    add(s, "c", 1)
    out = s.schedule()  # a's 9th token needs a block: b preempted; c must not be admitted
    assert out.preempted and all(c.seq.request.request_id == "a" for c in out.chunks)
    s.update(out)
    for seq in s.running:
        seq.token_ids.append(0)
    drain(s)
    assert_all_free(s)


def test_lone_sequence_preempted_by_itself_recovers():
    s = make_scheduler(num_blocks=3, budget=64, caching=False)
    a = add(s, "a", 4, max_tokens=7)
    b = add(s, "b", 4, max_tokens=2)
    drain(s)
    assert a.sequences[0].num_output_tokens == 7 and b.sequences[0].num_output_tokens == 2
    assert_all_free(s)


def test_prefix_cache_lets_a_second_request_skip_cached_blocks():
    s = make_scheduler(budget=64)
    add(s, "a", 13, first_token=0)
    drain(s)
    request = add(s, "b", 13, first_token=0)
    assert step(s) == {"b#0": 1}  # 3 full blocks cached, only the last prompt token is computed
    assert request.num_cached_prompt_tokens == 12
    drain(s)
    assert s.block_manager.prefix_hits_tokens == 12
    assert_all_free(s)


def test_n_completions_share_the_prompt_blocks():
    s = make_scheduler(budget=64)
    request = add(s, "a", 10, n=3, max_tokens=3)
    leader, *children = request.sequences
    assert leader.fork_at == 8
    assert step(s) == {"a#0": 8}  # the shared whole blocks first
    # then every completion computes its own tail (2 tokens) and samples
    assert step(s) == {"a#0": 2, "a#1": 2, "a#2": 2}
    shared = leader.block_table[:2]
    assert all(seq.block_table[:2] == shared for seq in children)
    assert all(s.block_manager.ref_counts[b] == 3 for b in shared)
    assert len({seq.block_table[2] for seq in request.sequences}) == 3
    drain(s)
    assert all(seq.num_output_tokens == 3 for seq in request.sequences)
    assert_all_free(s)


def test_n_completions_count_against_max_num_seqs():
    s = make_scheduler(max_num_seqs=3)
    add(s, "a", 9, n=2)  # 9 tokens: a#1 waits for a#0's first 8 (pending fork, holds a seat)
    add(s, "b", 3, n=2)  # 3 tokens: nothing to share, b#0 and b#1 queue on their own
    assert step(s) == {"a#0": 8, "b#0": 3}  # b#1 would make 4 sequences
    assert s.num_running == 3 and s.num_waiting == 1  # a#1 forked once a#0 computed 8 tokens; b#1 waits
    while s.has_unfinished():
        step(s)
        assert s.num_running + sum(len(q.pending_forks) for q in s.running) <= 3
    assert_all_free(s)


def test_finishing_a_waiting_request_removes_it_and_its_pending_forks():
    s = make_scheduler()
    request = add(s, "a", 9, n=2)
    for seq in request.sequences:
        if not seq.is_finished:
            s.finish(seq)
    assert not s.has_unfinished() and all(seq.is_finished for seq in request.sequences)
    assert_all_free(s)
