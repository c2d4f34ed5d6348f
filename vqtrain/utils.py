"""Small helpers shared across the package."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
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


def ceil_div(a: Tensor | int, b: int) -> Tensor | int:
    """ceil(a / b) for integers and integer tensors: positions a stride leaves of `a` samples."""
    return -(-a // b)


def channel_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A (B, T) mask spread over every axis between batch and time of `like` (B, ..., T)."""
    return mask.view(mask.shape[0], *([1] * (like.ndim - 2)), mask.shape[-1]).expand_as(like)


def mask_time(x: Tensor, lengths: Tensor | None, stride: int = 1) -> Tensor:
    """Zero the positions of (B, ..., T) past ceil(lengths / stride): a clip's padding
    at a resolution `stride` times coarser than its samples."""
    if not exists(lengths):
        return x
    valid = lengths_to_mask(ceil_div(lengths, stride), x.shape[-1])
    return torch.where(channel_mask(valid, x), x, torch.zeros((), dtype=x.dtype, device=x.device))


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
