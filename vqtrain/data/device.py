"""Where the data meets the device: loader defaults for this machine, and
batches cut on the device from a dataset that lives there whole.

A batch from `DeviceBatches` is one `index_select` of rows already converted
and on the device: no workers, no per-item Python, no host-to-device copy per
step. Its batches come from the same batch sampler as the ordinary DataLoader
(order drawn from (seed, epoch), sharded by rank, a resumed epoch's first
batches skipped), so both paths give the same batches.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .batch import Batch

log = logging.getLogger(__name__)

ON_DEVICE_SHARE = 0.25  # data.on_device=auto: a dataset up to this share of the free device memory moves there
MAX_WORKERS = 8  # data.num_workers=auto: more rarely pays for their memory and start-up


def available_cpus() -> int:
    """The cores this process may run on (a SLURM or container limit), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_workers(device: torch.device, cpus: int) -> int:
    """Loader worker processes for `cpus` cores per training process. Training
    on the CPU needs every core for the model, and with one or two cores per
    process the main process loads fastest: 0. Training on a GPU with more,
    workers prepare the next batches while it computes; one core stays with
    the main process."""
    if device.type == "cpu" or cpus <= 2:
        return 0
    return min(MAX_WORKERS, cpus - 1)


def decide_on_device(setting: bool | str, device: torch.device, nbytes: int) -> bool:
    """data.on_device: true/false as given; auto is on for a CUDA device when the
    dataset takes under ON_DEVICE_SHARE of its free memory (the rest is the
    model's), off elsewhere: on the CPU the rows are already where the model is."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    fits = nbytes < ON_DEVICE_SHARE * free
    log.info(
        "data.on_device=auto: %d MiB of images %s %s (%d MiB free)",
        nbytes >> 20,
        "live on" if fits else "stay on the host, too large for",
        device,
        free >> 20,
    )
    return fits


class DeviceBatches:
    """What Lightning takes for a DataLoader: the batches of `batch_sampler`
    as rows of `rows`, a tensor already on the device. Lightning reorders an
    epoch through `batch_sampler.sampler.set_epoch`, as for a DataLoader;
    `dataset` and `collate_fn` serve code that collates single items as a
    DataLoader would (ReconstructionLogger's fixed batch)."""

    def __init__(
        self, rows: Tensor, batch_sampler: Sampler[list[int]], dataset: Dataset, collate_fn: Callable[[list], Batch]
    ):
        self.rows = rows
        self.batch_sampler = batch_sampler
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        # like a DataLoader, take the sampler's iterator now: a resumed epoch decides what it skips here
        return self.batches(iter(self.batch_sampler))

    def batches(self, lists: Iterator[list[int]]) -> Iterator[Batch]:
        lists = list(lists)
        if not lists:
            return
        # the epoch's order goes to the device once; each batch is a slice of it
        order = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
        order = order.to(self.rows.device, non_blocking=True)  # pageable memory: staged, no wait on the device
        for index in order.split([len(batch) for batch in lists]):
            yield Batch(x=self.rows.index_select(0, index), index=index, skipped=index.new_zeros(()))
