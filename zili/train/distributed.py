"""Data parallelism through torch.distributed: one process per worker, started by torchrun.

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; without them training runs in one
process and every collective below is a no-op. CPUs use the gloo backend, GPUs NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False
    """True when this process created the group, so it also tears it down."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every process."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun describes in the environment (or an existing one)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistEnv()
    dist.init_process_group("gloo" if device_type == "cpu" else "nccl")
    return DistEnv(dist.get_rank(), dist.get_world_size(), owns_group=True)


def worker_threads(world_size: int) -> int:
    """CPU threads per process: OMP_NUM_THREADS when set (torchrun sets it), else the machine's
    cores shared among the processes of this machine."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, (os.cpu_count() or 1) // max(1, local))
