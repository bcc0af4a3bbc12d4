"""torch.distributed for the trainer: one process per rank under torchrun, or a plain single process.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; with WORLD_SIZE > 1 the group is created with
NCCL on GPUs and gloo on CPUs. Every helper is a no-op (identity) in a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_process_group() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return rank, world, device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if active():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if active():
        dist.barrier()
