"""Users sharded over processes with torch.distributed (torchrun): each rank trains and evaluates its own users.

Users' modules train independently (no gradient is shared), so sharding needs no all-reduce: a rank takes
the users whose position in the sorted id list is congruent to its rank, and results are gathered as Python
objects. Gloo on CPU, NCCL with one GPU per rank. Outside torchrun (WORLD_SIZE unset) everything here is the
single-process identity.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when initialised, else torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: str = "cpu") -> str:
    """Join the process group when launched by torchrun; returns this rank's device."""
    rank, size = world()
    if size > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return f"cuda:{local}"
    return device


def shard(users, rank: int | None = None, size: int | None = None) -> list:
    """This rank's users: every size-th of the sorted ids, starting at rank (any rank count covers all)."""
    r, s = world()
    rank, size = r if rank is None else rank, s if size is None else size
    return [u for i, u in enumerate(sorted(users)) if i % size == rank]


def barrier() -> None:
    if world()[1] > 1 and dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] when single-process)."""
    if world()[1] == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def is_main() -> bool:
    return world()[0] == 0


def finish() -> None:
    """Leave the process group together (a rank that exits while others still talk can abort them)."""
    if world()[1] > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
