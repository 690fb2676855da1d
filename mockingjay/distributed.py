"""Joining the torchrun process group: which rank this process is, and whether it logs and writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it
    enabled = property(lambda self: self.world_size > 1)
    is_main = property(lambda self: self.rank == 0)  # the rank that logs and writes


def setup_distributed(use_cuda: bool) -> DistributedContext:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set)."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", 0)),
            owns_group=False,
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1 or "RANK" not in os.environ:
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)
