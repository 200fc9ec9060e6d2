"""Joining the process group torchrun describes, and the collective helpers a run needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["DistInfo", "init_distributed", "all_reduce_mean", "gather"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_hint: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_hint in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, owns_group=True)


def all_reduce_mean(world: int) -> Callable[[list[Tensor]], None]:
    import torch.distributed as dist

    def reduce(tensors: list[Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    return reduce


def gather(obj: dict[str, Tensor], dist_info: DistInfo) -> list[dict[str, Tensor]]:
    """Every rank's ``obj`` (a dict of tensors, moved to the CPU), in rank order."""
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    items: list[Any] = [None] * dist_info.world
    dist.all_gather_object(items, {k: v.cpu() for k, v in obj.items()})
    return items
