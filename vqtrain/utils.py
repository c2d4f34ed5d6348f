"""Small helpers shared across the package."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def exists(value) -> bool:
    return value is not None


def default(value, fallback):
    return value if exists(value) else fallback


def l2norm(t: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    return F.normalize(t, dim=dim, eps=eps)


def lengths_to_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(B,) lengths -> (B, T) bool mask, True on the first `length` positions."""
    return torch.arange(max_length, device=lengths.device) < lengths[:, None]


def mask_to_lengths(mask: Tensor) -> Tensor:
    """(B, T) prefix mask -> (B,) lengths; refuses masks with holes (convs assume prefixes)."""
    lengths = mask.sum(-1)
    if not torch.equal(mask, lengths_to_mask(lengths, mask.shape[-1])):
        raise ValueError("mask must mark a prefix of each sequence as real (True...True, False...False)")
    return lengths


def ceil_div(a: Tensor, b: int) -> Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


# --- distributed: every helper is a no-op in a single process ---------------

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


# --- random number generators: saved in checkpoints for exact resumes --------

def rng_states() -> dict[str, Any]:
    """The global generators' states, as tensors and plain values (checkpoints
    load with weights_only). CUDA: the current device's, if CUDA was used."""
    name, keys, *rest = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])
