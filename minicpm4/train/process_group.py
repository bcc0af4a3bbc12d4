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


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: DDP (replicated weights, averaged gradients) or FSDP2 (each decoder layer and
    the root sharded over ranks with fully_shard, gathered per layer in forward/backward); the model itself when
    alone. FSDP2 shards in place, so build the optimizer after this call."""
    if not active():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(net: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    import contextlib
    if hasattr(net, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_states(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state), whole, on the CPU. Under FSDP2 this gathers the shards (a collective:
    every rank calls it, rank 0 receives them) and the optimizer state is keyed by parameter name."""
    if not sharded(model):
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    if not sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
