"""Small helpers shared across the package."""

from __future__ import annotations

import math
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


def all_finite(t: Tensor) -> Tensor:
    """Whether every value is finite (bool, on the device): `|t| < inf` is False for NaN and
    Inf alike, in three kernels where `torch.isfinite(t).all()` takes five."""
    return (t.abs() < math.inf).all()


def l2norm(t: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    return F.normalize(t, dim=dim, eps=eps)


def _wrap(value: int) -> int:
    """A 64-bit constant as the int64 that has its bits."""
    return value - 2**64 if value >= 2**63 else value


def _splitmix64(z: Tensor) -> Tensor:
    """SplitMix64's output function on int64 tensors (products wrap around; shifts made logical)."""
    z = z + _wrap(0x9E3779B97F4A7C15)
    z = (z ^ ((z >> 30) & (2**34 - 1))) * _wrap(0xBF58476D1CE4E5B9)
    z = (z ^ ((z >> 27) & (2**37 - 1))) * _wrap(0x94D049BB133111EB)
    return z ^ ((z >> 31) & (2**33 - 1))


def hashed_uniform(*keys: Tensor | int) -> Tensor:
    """float32 numbers in [0, 1), a pure function of the integer `keys` (int64 tensors
    broadcast; ints below 2^63): randomness drawn on the device from counters (a seed,
    a step held in a buffer, an item's number), with no generator to keep in step and
    no host-device sync."""
    device = next((key.device for key in keys if isinstance(key, Tensor)), None)
    z = torch.zeros((), dtype=torch.long, device=device)
    for key in keys:
        z = _splitmix64(z ^ key)
    return ((z >> 40) & (2**24 - 1)).float() / 2**24


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
    """ceil(a / b) for integers and integer tensors, b > 0: positions a stride leaves of `a` samples."""
    return (a + (b - 1)) // b


def channel_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A (B, T) mask spread over every axis between batch and time of `like` (B, ..., T)."""
    return mask.view(mask.shape[0], *([1] * (like.ndim - 2)), mask.shape[-1]).expand_as(like)


def mask_time(x: Tensor, lengths: Tensor | None, stride: int = 1) -> Tensor:
    """Zero the positions of (B, ..., T) past ceil(lengths / stride): a clip's padding
    at a resolution `stride` times coarser than its samples."""
    return TimeMasks(lengths)(x, stride)


class TimeMasks:
    """`mask_time` for one batch, each resolution's mask built once: a masked net re-zeroes
    the padding after every layer, and a small model's GPU step is bound by its launches.

    Masks are kept by stride and rank, and compared by length: a length in a dict key
    would be hashed, and torch.compile would then specialise a net to every clip length."""

    def __init__(self, lengths: Tensor | None):
        self.lengths = lengths
        self.masks: dict[tuple[int, int], Tensor] = {}  # (stride, ndim) -> (B, 1, ..., T), the latest T

    def __call__(self, x: Tensor, stride: int = 1) -> Tensor:
        if not exists(self.lengths):
            return x
        mask = self.masks.get((stride, x.ndim))
        if mask is None or mask.shape[-1] != x.shape[-1]:
            valid = lengths_to_mask(ceil_div(self.lengths, stride), x.shape[-1])
            mask = self.masks[stride, x.ndim] = valid.view(valid.shape[0], *([1] * (x.ndim - 2)), valid.shape[-1])
        return torch.where(mask, x, 0.0)


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
