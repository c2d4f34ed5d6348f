"""What every data module shares: the skip-counting collate to a `Batch`,
samplers, loaders, and a split in a fixed order for evaluation and tokens.

Batch order is a function of (seed, epoch) alone and every sampler shards
itself across ranks, so a checkpoint only needs to say how far into its epoch
training was: a resumed run skips those batches and trains on exactly the ones
a run never stopped would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.accelerators.cuda import is_cuda_available
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from ..config import InvalidConfig, Required, check_paths
from ..distributed import rank, world_size
from ..utils import exists
from .batch import Batch, empty_batch
from .device import auto_workers, available_cpus

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


class EpochSampler(DistributedSampler):
    """This rank's share of the items (all of them in one process), shuffled by
    (seed, epoch) alone, never by the global random stream."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)


class ResumingBatchSampler(Sampler[list[int]]):
    """The batches of `batches` less the first `done` of epoch `epoch`: the rest
    of the epoch a stopped run was in, in the order it would have seen them."""

    def __init__(self, batches: Sampler[list[int]], epoch: int, done: int):
        self.batches, self.epoch, self.done = batches, epoch, done
        self.sampler.set_epoch(epoch)  # Lightning builds the first iterator before it sets the epoch

    @property
    def sampler(self) -> Any:
        """What Lightning calls `set_epoch` on: the sampler that draws the order."""
        return self.batches.sampler

    def __iter__(self) -> Iterator[list[int]]:
        skip = self.done if self.sampler.epoch == self.epoch else 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)


def stack_images(items: list[dict]) -> Batch:
    return Batch(
        x=torch.stack([item["x"] for item in items]),
        index=torch.tensor([item["index"] for item in items]),
        skipped=torch.tensor(0),
    )


def collate_skipping(items: list, collate: Callable[[list[dict]], Batch] = stack_images) -> Batch:
    """Drop unreadable (None) items and record how many were dropped."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    return dataclasses.replace(collate(kept), skipped=torch.tensor(skipped)) if kept else empty_batch(skipped)


class DataModule(L.LightningDataModule):
    """Base for image and audio data: subclasses set `train_set`, `val_set`
    and optionally `test_set` (defaults to `val_set`) in `setup`.

    Samplers shard batches across ranks themselves, so the trainer must not
    inject a DistributedSampler: `use_distributed_sampler` says so."""

    modality: str = "image"  # or "audio": what the batches hold; the model must agree (checked at start-up)
    channels: int = 1
    use_distributed_sampler = False  # for Trainer(use_distributed_sampler=...)

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | str = "auto",
        strict: bool = False,
        pin_memory: bool | str = "auto",
    ):
        """num_workers: a count, or auto (`auto_workers`: by cores and device); pin_memory:
        true/false, or auto (when batches go to a CUDA device)."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers != "auto" and (
            not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0
        ):
            raise ValueError(f"data.num_workers must be a count >= 0 or auto, got {num_workers!r}")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise ValueError(f"data.pin_memory must be true, false or auto, got {pin_memory!r}")
        self.batch_size = batch_size
        self.workers_setting = num_workers
        self.pin_setting = pin_memory
        self.standalone_device: torch.device | None = None  # where batches go without a trainer (benchmarks, tests)
        self.strict = strict
        self.order_seed = torch.initial_seed() % 2**63  # batch order: the run's seed (seed_everything)
        self.train_set = self.val_set = self.test_set = None
        self.resume_at: dict[str, int] = {}

    def required_paths(self) -> list[Required]:
        """The folders and files this data reads, checked when a run starts, before
        the model or trainer exist (rather than in `setup`, inside `fit`)."""
        return []

    @property
    def device(self) -> torch.device:
        """Where the batches are used: the trainer's device once Lightning attaches one, else
        `standalone_device`, else CUDA if present (as accelerator=auto picks; asked without
        creating a CUDA context, which would break a later ddp_fork)."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return self.standalone_device or torch.device("cuda" if is_cuda_available() else "cpu")

    @property
    def num_workers(self) -> int:
        """data.num_workers, auto resolved for this host's cores shared by the node's training processes."""
        if self.workers_setting != "auto":
            return self.workers_setting
        processes = self.trainer.num_devices if self.trainer is not None else 1
        return auto_workers(self.device, available_cpus() // processes)

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches copy to a CUDA device asynchronously; elsewhere they bring nothing."""
        return self.device.type == "cuda" if self.pin_setting == "auto" else self.pin_setting

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch; Lightning keeps this in checkpoints."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A Batch moves field by field: Lightning's generic walk over collections costs
        about what a small model's step spends on a dozen kernels."""
        if isinstance(batch, Batch):
            return batch.to(device, non_blocking=device.type == "cuda")
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def collate(self, items: list) -> Batch:
        return collate_skipping(items)

    def batch_sampler(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> Sampler[list[int]]:
        """Batches of dataset indices; `.sampler.set_epoch` reorders them (Lightning calls it)."""
        return BatchSampler(EpochSampler(dataset, shuffle, self.order_seed), self.batch_size, drop_last)

    def batches(self, dataset: Dataset, shuffle: bool, drop_last: bool, resume: bool) -> Sampler[list[int]]:
        """The batch sampler of a loader; `resume`: continue a checkpoint's epoch where it stopped (training)."""
        batches = self.batch_sampler(dataset, shuffle, drop_last)
        if resume and self.resume_at:
            batches = ResumingBatchSampler(batches, self.resume_at["epoch"], self.resume_at["batches"])
        return batches

    def loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False, resume: bool = False) -> DataLoader:
        return DataLoader(
            SkippingDataset(dataset, self.strict),
            batch_sampler=self.batches(dataset, shuffle, drop_last, resume),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.order_seed),  # worker seeds: leave the global stream alone
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, shuffle=True, drop_last=len(self.train_set) > self.batch_size, resume=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set if self.test_set is not None else self.val_set, shuffle=False)


def hash_fraction(path: Path) -> float:
    """A stable pseudo-random number in [0, 1) from a path: the split survives adding files."""
    return int.from_bytes(hashlib.sha1(path.as_posix().encode()).digest()[:8], "big") / 2**64


# --- a split in a fixed order (evaluation, token shards) -------------------------

SPLITS = ("train", "val", "test")


def split_dataset(datamodule: DataModule, split: str) -> Dataset:
    """A split in a fixed order, as training's val/test see it: test falls back
    to val, and the training split's random crops are off."""
    if split not in SPLITS:
        raise InvalidConfig(f"split must be one of {SPLITS}, got {split!r}")
    check_paths(datamodule.required_paths())
    datamodule.setup()
    dataset = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}[split]
    dataset = datamodule.val_set if dataset is None else dataset
    if getattr(dataset, "random_crop", False):
        dataset.random_crop = False  # this data module is ours alone
    return dataset


def item_id(dataset: Dataset, position: int) -> str | int:
    """A file's path (relative to the data root for audio), else the position in the split."""
    files = getattr(dataset, "files", None)
    return str(files[position]) if exists(files) else position
