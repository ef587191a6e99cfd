"""Multi-process training on torch.distributed (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched by it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
