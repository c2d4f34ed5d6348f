"""The batch every collate returns and every step reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """Images: `x` (B, C, H, W) in [-1, 1]. Audio: `x` (B, 1, T) zero-padded,
    `mask` (B, T) True on real samples and `lengths` (B,) their counts, both
    made by the collate (so no step derives one from the other). `index` (B,)
    dataset positions; `skipped` how many items of this batch were unreadable
    and dropped. When every item was unreadable, `x` is None and `index` empty."""

    x: Tensor | None
    index: Tensor
    skipped: Tensor
    mask: Tensor | None = None
    lengths: Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    def pin_memory(self) -> Batch:
        """What a DataLoader with pin_memory=True calls on a custom batch type."""
        return self.map_tensors(Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        return dataclasses.replace(
            self,
            **{
                field.name: fn(value)
                for field in dataclasses.fields(self)
                if isinstance(value := getattr(self, field.name), Tensor)
            },
        )


def empty_batch(skipped: int) -> Batch:
    return Batch(x=None, index=torch.zeros(0, dtype=torch.long), skipped=torch.tensor(skipped))
