"""Length-bucketed batches for padded audio: clips of similar length share a
batch, so little compute goes to padding. Distributed-aware by itself, because
Lightning cannot inject a DistributedSampler into a custom batch sampler."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..distributed import rank as current_rank
from ..distributed import world_size
from ..utils import ceil_div, default


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, reshuffled every epoch (`set_epoch`) and
    deterministic given (seed, epoch).

    With `bucketing`, a random permutation is cut into pools of `pool_batches`
    batches, each pool is sorted by length and cut into batches, and the batch
    order is shuffled: similar lengths, random content. Without `shuffle`
    (validation) the whole set is sorted, for the least padding, and the batches
    come in one fixed random order, so that a partial pass (limit_val_batches)
    still sees every length.

    Every rank draws the same global batch list and takes every
    `num_replicas`-th batch, so ranks get disjoint batches and equally many:
    `drop_last` drops the incomplete batch and the batches beyond a multiple of
    `num_replicas`; otherwise the list is padded by repeating its first batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        bucketing: bool = True,
        shuffle: bool = True,
        drop_last: bool = False,
        pool_batches: int = 100,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ):
        if isinstance(lengths, Sampler):
            raise TypeError(
                "BucketBatchSampler shards batches across ranks itself: "
                "set trainer.use_distributed_sampler=false so Lightning does not replace its sampler"
            )
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
        self.num_replicas = default(num_replicas, world_size())
        self.rank = default(rank, current_rank())
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size = batch_size
        self.bucketing = bucketing
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pool_batches = pool_batches
        self.seed = seed
        self.epoch = 0

    @property
    def sampler(self) -> BucketBatchSampler:
        """Lightning calls `batch_sampler.sampler.set_epoch(epoch)` at every epoch start."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's batches for all ranks together, before sharding."""
        count = len(self.lengths)
        if count == 0:
            return []
        generator = torch.Generator().manual_seed(self.seed + self.epoch if self.shuffle else self.seed)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        if self.bucketing:
            pool = self.pool_batches * self.batch_size if self.shuffle else count
            order = torch.cat(
                [chunk[self.lengths[chunk].argsort(descending=True, stable=True)] for chunk in order.split(pool)]
            )
        batches = list(order.split(self.batch_size))
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle or self.bucketing:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        else:
            batches += [batches[i % len(batches)] for i in range(-len(batches) % self.num_replicas)]
        for batch in batches[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        if self.drop_last:
            return full // self.num_replicas
        return ceil_div(full + (rest > 0), self.num_replicas)


def padding_fraction(batch_lengths: Iterable[Sequence[int]]) -> float:
    """Share of the padded (B x longest) samples that are padding, over all batches."""
    padded = real = 0
    for lengths in batch_lengths:
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / padded if padded else 0.0


def measure_padding(lengths: Sequence[int], batch_size: int, bucketing: bool = True, seed: int = 0) -> float:
    """Padding fraction of one training epoch (shuffled, single rank) over clips of these lengths."""
    sampler = BucketBatchSampler(lengths, batch_size, bucketing=bucketing, seed=seed, num_replicas=1, rank=0)
    return padding_fraction([lengths[i] for i in batch] for batch in sampler)
