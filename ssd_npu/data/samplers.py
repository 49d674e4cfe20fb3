"""Training and validation samplers, and the one resume interface every training sampler has.

Every sample's randomness is seeded from (seed, image_id, epoch), and the epoch travels with
each index: samplers yield `SampleKey(index, epoch, pad)`, because a counter kept inside
(persistent) DataLoader workers would depend on which worker saw which image.

Resume: a training sampler's order is a function of (seed, epoch) alone, so a resumed run
re-enters an epoch exactly: the loop calls `set_epoch(epoch)` and, mid-epoch, `skip(batches)`
to drop the batches an interrupted run already trained on (`ResumableSampler`).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Iterator
from typing import NamedTuple

from torch.utils.data import DistributedSampler, Sampler


class SampleKey(NamedTuple):
    index: int
    epoch: int = 0
    pad: bool = False  # a repeated sample that only fills the last batch (image_id -> -1)


class ResumableSampler(Sampler):
    """A training sampler the loop can put at any (epoch, batch): `set_epoch`, then `skip`.

    `set_epoch(e)`: the next pass is epoch e (later passes count on by themselves).
    `skip(n)`: the next pass leaves out its first n batches (whole batches of the loader).
    """

    @abstractmethod
    def set_epoch(self, epoch: int) -> None: ...

    @abstractmethod
    def skip(self, num_batches: int) -> None: ...


class EpochSampler(ResumableSampler):
    """Shuffled indices as SampleKey(i, epoch): a DistributedSampler (one replica or this
    rank's share), reshuffled per epoch from (seed, epoch); `batch_size` converts `skip`."""

    def __init__(self, inner: DistributedSampler, batch_size: int) -> None:
        self.inner, self.batch_size = inner, batch_size
        self.epoch, self.skipped = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, num_batches: int) -> None:
        self.skipped = num_batches * self.batch_size

    def __len__(self) -> int:
        return len(self.inner) - self.skipped

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skipped, self.skipped = self.skipped, 0
        self.inner.set_epoch(epoch)  # DistributedSampler reshuffles per epoch
        # the skipped positions are dropped from the index list: no sample is read for them
        for i in itertools.islice(self.inner, skipped, None):
            yield SampleKey(int(i), epoch)


class PaddedSequentialSampler(Sampler):
    """This rank's share of 0..n-1 (every `world`-th index from `rank`), in order, then
    repeats marked `pad` up to a multiple of batch_size (every batch has the static shape)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.share = list(range(rank, n, world)) or [0]
        self.real = len(range(rank, n, world))
        self.total = max(1, -(-self.real // batch_size)) * batch_size

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[SampleKey]:
        for i in range(self.total):
            yield SampleKey(self.share[i % len(self.share)], 0, i >= self.real)
