"""Transparent huge pages for the model weights a decode step streams from memory (and, through
huge_page_buffer, for the paged KV cache: zili/engine/paged_attention.py).

Batch-1 decode reads every weight once per token, so it runs at the memory read rate, and on 4 KiB
pages that rate stops well short of what the memory delivers: the hardware prefetchers stop at every
page boundary and every page costs a TLB miss (a two-level walk under a hypervisor). On the benchmark
machine a streaming read of 773 MB ran at ~19 GB/s on 4 KiB pages and ~27 GB/s on 2 MiB pages.

move_to_huge_pages copies a model's tensors into anonymous mappings aligned to 2 MiB and advised with
MADV_HUGEPAGE, so the kernel backs them with huge pages where it has them (THP mode "always" or
"madvise"; "never" or ZILI_HUGE_PAGES=0 turns this off, and other systems keep plain allocations).
PyTorch's own switch, THP_MEM_ALLOC_ENABLE, is read once when torch loads: too late for a library.
A mapping is returned to the system when the last tensor on it is freed. The tensors of an arena
share one storage: safetensors saves each tensor's own bytes, but torch.save of a single tensor
writes its whole arena (clone it first).
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

HUGE_PAGE = 2 << 20
PAGE = 4 << 10
ARENA_BYTES = 64 << 20
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_ARENAS: set[int] = set()  # start addresses of the live mappings made here (already on huge pages)


def enabled() -> bool:
    """True where big tensors are placed on huge-page-advised memory."""
    if os.environ.get("ZILI_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """nbytes uninitialized bytes (uint8) starting on a 2 MiB boundary, advised for huge pages."""
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE  # whole huge pages: the tail gets one too
    region = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP (or a sandbox) refuses the advice: plain pages, still aligned
        pass
    # numpy holds a buffer export of the mapping (it cannot be unmapped under the tensor) and
    # torch.from_numpy holds the array: the mapping lives exactly as long as tensors use it.
    array = np.frombuffer(region, dtype=np.uint8)
    raw = torch.from_numpy(array)
    _ARENAS.add(raw.data_ptr())
    weakref.finalize(array, _ARENAS.discard, raw.data_ptr())
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def _storages(module: nn.Module, min_bytes: int) -> list[list[torch.Tensor]]:
    """The CPU parameters and buffers of `module` grouped by storage (storages of >= min_bytes), in
    module order: the order a forward pass reads them. Storages already in an arena are left out."""
    groups: dict[int, list[torch.Tensor]] = {}
    for sub in module.modules():
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            storage = tensor.untyped_storage()
            if tensor.device.type != "cpu" or storage.nbytes() < min_bytes or storage.data_ptr() in _ARENAS:
                continue
            group = groups.setdefault(storage.data_ptr(), [])
            if all(t is not tensor for t in group):
                group.append(tensor)
    return list(groups.values())


def move_to_huge_pages(module: nn.Module, min_bytes: int = PAGE, arena_bytes: int = ARENA_BYTES) -> int:
    """Copy the CPU parameters and buffers of `module` (storages of >= min_bytes) onto huge-page-advised
    memory, in place, and return the bytes moved. Untouched memory (a model fresh from to_empty) reads
    as the kernel's zero page: moving it first and loading after faults no 4 KiB page at all.

    Storages are laid out back to back (4 KiB aligned) in module order, in arenas of about arena_bytes,
    so small tensors (an int4 attention projection is ~0.5 MB) share huge pages instead of each wasting
    most of one. The tensor objects stay: tied weights stay tied, views of one storage stay views of one
    storage. Arena by arena, so memory grows by about one arena while this runs. An arena is unmapped
    with the last tensor on it, so a model whose layers are dropped one by one should not be moved."""
    if not enabled():
        return 0
    pending = _storages(module, min_bytes)
    moved = 0
    with torch.no_grad():
        while pending:
            batch, size = [], 0
            while pending and (not batch or size + pending[0][0].untyped_storage().nbytes() <= arena_bytes):
                group = pending.pop(0)
                batch.append((size, group))
                size += -(-group[0].untyped_storage().nbytes() // PAGE) * PAGE
            arena = huge_page_buffer(size)
            for offset, tensors in batch:
                storage = tensors[0].untyped_storage()
                target = arena[offset:offset + storage.nbytes()]
                target.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
                base = target.storage_offset()  # bytes, a multiple of 4 KiB
                for t in tensors:
                    t.set_(arena.untyped_storage(), base // t.element_size() + t.storage_offset(), t.shape, t.stride())
                moved += storage.nbytes()
    return moved


def mapping_fields(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields (AnonHugePages, VmFlags, ...) of the mapping holding `address`;
    None where smaps cannot be read or nothing is mapped there."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    fields = None
    for line in lines:
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # a mapping's first line: low-high perms ...
            if fields is not None:
                return fields
            low, high = (int(part, 16) for part in head.split("-"))
            fields = {} if low <= address < high else None
        elif fields is not None:
            fields[head.rstrip(":")] = rest.strip()
    return fields


def huge_page_bytes(tensor: torch.Tensor) -> int | None:
    """Bytes of the mapping holding `tensor` that the kernel backs with huge pages now (AnonHugePages);
    None where that cannot be read."""
    fields = mapping_fields(tensor.data_ptr())
    if fields is None or "AnonHugePages" not in fields:
        return None
    return int(fields["AnonHugePages"].split()[0]) * 1024
