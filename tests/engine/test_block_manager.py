"""BlockManager with fake sequences and a fake block count: allocation, sharing, prefix cache, LRU."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zili.engine.block_manager import BlockManager


@dataclass
class FakeSeq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_content_ids: list[int] = field(default_factory=list)


def compute_all(bm: BlockManager, seq: FakeSeq, cached: list[int] = ()) -> None:
    """Allocate the whole sequence, pretend the model computed it, register its full blocks."""
    assert bm.allocate(seq, len(seq.token_ids) - len(cached) * bm.block_size, cached)
    seq.num_computed_tokens = len(seq.token_ids)
    bm.commit(seq)


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = FakeSeq(list(range(9)))
    assert bm.allocate(seq, 9)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7
    seq.num_computed_tokens = 9
    assert bm.allocate(seq, 3)  # 12 tokens still fit 3 blocks
    assert len(seq.block_table) == 3
    assert bm.allocate(seq, 4)  # 13 needs a 4th
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 10 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_allocation_fails_without_side_effects_when_full():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = FakeSeq(list(range(8))), FakeSeq(list(range(100, 108)))
    assert bm.allocate(a, 8)
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_prefix_match_reuses_full_computed_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = FakeSeq(list(range(10)))
    compute_all(bm, first)
    # 10 tokens -> 2 full blocks registered
    assert bm.num_cached_blocks == 2
    assert bm.match_prefix(list(range(10)) + [99]) == first.block_table[:2]
    # 8 tokens exactly: the second block holds the last token, which must be computed again
    assert bm.match_prefix(list(range(8))) == first.block_table[:1]
    assert bm.match_prefix([5] + list(range(1, 12))) == []


def test_same_block_content_at_another_position_does_not_match():
    bm = BlockManager(num_blocks=16, block_size=2)
    compute_all(bm, FakeSeq([1, 2, 3, 4, 5]))
    # block [3, 4] is cached after [1, 2]; after [9, 9] it is a different prefix
    assert bm.match_prefix([9, 9, 3, 4, 7]) == []
    assert len(bm.match_prefix([1, 2, 3, 4, 7])) == 2


def test_shared_blocks_are_reference_counted_and_hits_are_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = FakeSeq(list(range(12)))
    compute_all(bm, a)
    b = FakeSeq(list(range(8)) + [50, 51, 52])
    cached = bm.match_prefix(b.token_ids)
    assert cached == a.block_table[:2]
    assert bm.allocate(b, len(b.token_ids) - 8, cached)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert bm.prefix_hits_tokens == 8 and bm.prefix_queries_tokens == 12 + 11
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.ref_counts)


def test_freed_cached_blocks_are_evicted_lru_only_when_space_is_needed():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = FakeSeq([1, 2, 3]), FakeSeq([7, 8, 9])
    compute_all(bm, old)  # 2 blocks, 1 full cached
    compute_all(bm, new)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # two never-cached blocks are free: using them evicts nothing
    filler = FakeSeq([20, 21, 22, 23])
    assert bm.allocate(filler, 4)
    assert bm.num_cached_blocks == 2
    # the next block evicts the least recently freed cached one (old's), keeping new's
    extra = FakeSeq([30])
    assert bm.allocate(extra, 1)
    assert bm.match_prefix([1, 2, 3]) == [] and len(bm.match_prefix([7, 8, 9])) == 1
    for seq in (filler, extra):
        bm.free(seq)


def test_reviving_a_cached_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = FakeSeq([1, 2, 3, 4, 5])
    compute_all(bm, a)
    bm.free(a)
    b = FakeSeq([1, 2, 3, 4, 6])
    cached = bm.match_prefix(b.token_ids)
    assert len(cached) == 2
    assert bm.can_allocate(b, 1, cached)
    assert bm.allocate(b, 1, cached)
    assert bm.num_free_blocks == 0 and b.num_computed_tokens == 4
    bm.free(b)


def test_fork_shares_whole_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = FakeSeq(list(range(9))), FakeSeq(list(range(9)))
    assert bm.allocate(parent, 8)
    parent.num_computed_tokens = 8
    bm.fork(parent, child, 8)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 8
    assert all(bm.ref_counts[b] == 2 for b in parent.block_table)
    assert bm.allocate(child, 1) and len(child.block_table) == 3
    with pytest.raises(ValueError):
        bm.fork(parent, FakeSeq([]), 6)  # not a block multiple
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_prefix_caching_off_registers_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    seq = FakeSeq([1, 2, 3, 4, 5])
    compute_all(bm, seq)
    assert bm.num_cached_blocks == 0 and bm.match_prefix([1, 2, 3, 4, 5]) == []
    bm.free(seq)
    assert bm.num_free_blocks == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 3), min_size=1, max_size=12)),
                min_size=1, max_size=40))
def test_random_operations_never_leak_or_double_book(ops):
    """Whatever the order of allocations, commits and frees: every block is either referenced by
    exactly as many live sequences as its count says, or free; freeing everything frees all."""
    bm = BlockManager(num_blocks=12, block_size=2)
    live: list[FakeSeq] = []
    for action, tokens in ops:
        if action <= 1:  # new sequence, reusing whatever prefix is cached
            seq = FakeSeq(tokens)
            cached = bm.match_prefix(tokens)
            if bm.allocate(seq, len(tokens) - len(cached) * 2, cached):
                seq.num_computed_tokens = len(tokens)
                bm.commit(seq)
                live.append(seq)
        elif action == 2 and live:
            bm.free(live.pop(0))
        elif live:  # grow the newest by one token
            seq = live[-1]
            if bm.allocate(seq, 1):
                seq.token_ids.append(tokens[0])
                seq.num_computed_tokens += 1
                bm.commit(seq)
        held = [b for seq in live for b in seq.block_table]
        assert sum(bm.ref_counts) == len(held)
        assert bm.num_used_blocks == len(set(held))
        for seq in live:
            assert len(seq.block_table) == bm.blocks_needed(len(seq.token_ids))
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == 12 and all(c == 0 for c in bm.ref_counts)
