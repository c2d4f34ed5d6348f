"""What every data module shares: batch layout, skip-counting collate, loaders.

A batch is a dict: "x" (the signal: images (B, C, H, W) in [-1, 1], audio
(B, 1, T)), "index" (B,) dataset positions, for audio also "mask" (B, T) bool
(True = real sample) and "lengths" (B,), and "skipped": how many items of this
batch were unreadable and dropped (the model logs the running total).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

log = logging.getLogger(__name__)


class UnreadableItem(Exception):
    """Raised by a dataset for an item that cannot be decoded (corrupt, empty, unsupported)."""


class SkippingDataset(Dataset):
    """Wraps a dataset: an item raising UnreadableItem becomes None (counted by
    the collate) or, with strict=True, an error naming the item."""

    def __init__(self, dataset: Dataset, strict: bool = False):
        self.dataset = dataset
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UnreadableItem as error:
            if self.strict:
                raise RuntimeError(f"data.strict=true and an item is unreadable: {error}") from error
            log.warning("skipping unreadable item: %s", error)
            return None


def collate_skipping(items: list, collate=default_collate) -> dict:
    """Drop unreadable (None) items and record how many were dropped."""
    kept = [item for item in items if item is not None]
    batch = collate(kept) if kept else {}
    batch["skipped"] = torch.tensor(len(items) - len(kept))
    return batch


class DataModule(L.LightningDataModule):
    """Base for image and audio data: subclasses set `train_set`, `val_set`
    and optionally `test_set` (defaults to `val_set`) in `setup`."""

    modality: str = "image"
    channels: int = 1

    def __init__(self, batch_size: int = 64, num_workers: int = 0, strict: bool = False, pin_memory: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.strict = strict
        self.pin_memory = pin_memory
        self.train_set = self.val_set = self.test_set = None

    def collate(self, items: list) -> dict:
        return collate_skipping(items)

    def loader(self, dataset: Dataset, shuffle: bool, **kwargs) -> DataLoader:
        return DataLoader(
            SkippingDataset(dataset, self.strict),
            batch_size=kwargs.pop("batch_size", self.batch_size),
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=self.collate,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, shuffle=True, drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set if self.test_set is not None else self.val_set, shuffle=False)


def hash_fraction(path: Path) -> float:
    """A stable pseudo-random number in [0, 1) from a path: the split survives adding files."""
    return int.from_bytes(hashlib.sha1(path.as_posix().encode()).digest()[:8], "big") / 2**64
