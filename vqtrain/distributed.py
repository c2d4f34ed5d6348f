"""Collectives that are no-ops in a single process, so that code written for
several ranks runs unchanged in one."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_min(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    if is_distributed():
        dist.broadcast(t, src)
    return t


def all_gather(t: Tensor) -> Tensor:
    """(world, ...) `t` of every rank (all the same shape), stacked in rank order."""
    if not is_distributed():
        return t.unsqueeze(0)
    gathered = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(gathered, t.contiguous())
    return torch.stack(gathered)


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate the rows of `t` from every rank (row counts may differ, even be 0)."""
    if not is_distributed():
        return t
    world = dist.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])
