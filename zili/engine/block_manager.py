"""Paged KV cache bookkeeping: block allocation, reference counts, prefix caching. No tensors.

The KV cache is `num_blocks` blocks of `block_size` token slots; a sequence's `block_table` lists
the blocks holding its tokens in order. Blocks are reference counted so n > 1 completions and
requests with a common prompt prefix share them.

Prefix caching: once a block is full and computed it is registered under its content, the key
(content id of the previous block, the block's token ids). Keys are compared exactly (a dict of
tuples), so there is no hash collision to fear and no way for one request to forge another's
cache entry; content ids are small integers never reused. A new sequence walks its prompt block by
block and reuses every registered block it finds. Freed registered blocks stay cached in an LRU
list and are evicted (least recently used first) only when a fresh block is needed.

Works with any object that has `token_ids`, `num_computed_tokens`, `block_table` and
`block_content_ids` (tests use small fakes).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

ROOT_CONTENT_ID = -1


class BlockOwner(Protocol):
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    block_content_ids: list[int]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Never-cached free blocks, used as a stack: recently freed memory is reused first, so
        # untouched pages of a large CPU cache stay untouched.
        self._free: list[int] = list(reversed(range(num_blocks)))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; oldest first
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # cached block -> its key
        self._key_to_content: dict[tuple[int, tuple[int, ...]], int] = {}
        self._content_to_block: dict[int, int] = {}
        self._block_content: dict[int, int] = {}
        self._next_content_id = 0
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    # ---- capacity -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (never-used plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_key)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest whole-block prefix of `token_ids` (no side effects).

        The last token is never matched: the model must compute at least one token for logits.
        """
        if not self.enable_prefix_caching:
            return []
        size, parent, blocks = self.block_size, ROOT_CONTENT_ID, []
        for start in range(0, (len(token_ids) - 1) // size * size, size):
            content = self._key_to_content.get((parent, tuple(token_ids[start:start + size])))
            if content is None:
                break
            blocks.append(self._content_to_block[content])
            parent = content
        return blocks

    def commit(self, seq: BlockOwner) -> None:
        """Register the sequence's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for i in range(len(seq.block_content_ids), seq.num_computed_tokens // size):
            parent = seq.block_content_ids[i - 1] if i else ROOT_CONTENT_ID
            key = (parent, tuple(seq.token_ids[i * size:(i + 1) * size]))
            content = self._key_to_content.get(key)
            block = seq.block_table[i]
            if content is None and block not in self._block_content:
                content = self._next_content_id
                self._next_content_id += 1
                self._key_to_content[key] = content
                self._content_to_block[content] = block
                self._block_content[block] = content
                self._block_key[block] = key
            elif content is None:  # a shared block already registered under this content
                content = self._block_content[block]
            seq.block_content_ids.append(content)  # duplicates keep the registered id

    # ---- allocation -----------------------------------------------------------------------

    def can_allocate(self, seq: BlockOwner, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        have = len(seq.block_table) + len(cached_blocks)
        base = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        new = max(0, self.blocks_needed(base + num_new_tokens) - have)
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return new + revived <= self.num_free_blocks

    def allocate(self, seq: BlockOwner, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones; False if there is none.

        `cached_blocks` (from `match_prefix`, only for a sequence holding no blocks yet) become the
        start of its block table and count as computed.
        """
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        if cached_blocks and seq.block_table:
            raise ValueError("cached blocks can only start an empty block table")
        if self.enable_prefix_caching and not seq.block_table:
            self.prefix_queries_tokens += len(seq.token_ids)
            self.prefix_hits_tokens += len(cached_blocks) * self.block_size
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_content_ids.append(self._block_content[block])
        seq.num_computed_tokens += len(cached_blocks) * self.block_size
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < needed:
            block = self._take_free_block()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # least recently used cached block
        key = self._block_key.pop(block)
        del self._key_to_content[key]
        del self._content_to_block[self._block_content.pop(block)]
        return block

    def fork(self, parent: BlockOwner, child: BlockOwner, num_tokens: int) -> None:
        """The child adopts the parent's first `num_tokens` (a block multiple) of computed KV."""
        if num_tokens % self.block_size or num_tokens > parent.num_computed_tokens or child.block_table:
            raise ValueError("fork shares whole computed blocks with a sequence that holds none")
        shared = num_tokens // self.block_size
        for block in parent.block_table[:shared]:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table[:shared])
        child.block_content_ids = list(parent.block_content_ids[:shared])
        child.num_computed_tokens = num_tokens

    def free(self, seq: BlockOwner) -> None:
        """Drop the sequence's references; blocks nobody holds become free (cached ones evictable).

        Freed in reverse so a sequence's tail blocks are evicted before its head blocks, which
        other prompts are likelier to share.
        """
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._block_key:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.block_content_ids = []
        seq.num_computed_tokens = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0
