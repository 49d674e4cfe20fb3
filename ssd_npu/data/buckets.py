"""Box-count buckets: `max_boxes=[16,32,64]` pads each batch to the smallest bucket that holds it.

One `max_boxes` is a trade: large enough for the busiest image means most target rows are
padding the device computes on for nothing. With buckets, every batch is padded to the
smallest bucket holding its largest image's box count, so the device sees at most
len(buckets) target shapes (`boxes [B, M, 4]`, M in buckets) while padding falls.

`BucketBatchSampler` keeps buckets full: per epoch it puts each image in the bucket of its
annotation box count (after crowd/degenerate filtering; augmentation only removes boxes, so
the bucket still holds the sample), shuffles within buckets, forms full batches per bucket
(the last partial batch of each bucket is dropped) and shuffles the batch order. The order is
a function of (seed, epoch) alone, so a resumed run re-enters an epoch exactly (`set_epoch`, `skip`: `ssd_npu.data.samplers.ResumableSampler`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ssd_npu.data.fixed_shape import sample_seed
from ssd_npu.data.samplers import ResumableSampler


def bucket_of(counts: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Index of the smallest bucket >= each count (the largest for counts above it).

    The one bucket rule: the sampler and the data report's recommendation both use it.
    """
    return np.minimum(np.searchsorted(np.asarray(sizes), counts), len(sizes) - 1)


def bucket_sizes(max_boxes: Any) -> tuple[int, ...]:
    """`max_boxes` as sorted bucket sizes: 32 -> (32,); [16, 32] -> (16, 32)."""
    if isinstance(max_boxes, int):
        return (int(max_boxes),)
    return tuple(int(v) for v in max_boxes)


class BucketBatchSampler(ResumableSampler):
    """Batches of keys, each batch from one box-count bucket; an epoch's order from (seed, epoch).

    counts [N] boxes per image (annotation counts after filtering); sizes: sorted buckets.
    Distributed: batches of batch_size * num_replicas are formed per bucket and each rank takes
    its slice, so every rank is in the same bucket at the same step (same shapes, same time).
    `key(index, epoch)` builds what the data set receives (the loader's SampleKey).
    """

    def __init__(
        self,
        counts: np.ndarray,
        sizes: Sequence[int],
        batch_size: int,
        seed: int,
        key: Callable[[int, int], Any] = lambda i, epoch: (i, epoch),
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.bucket = bucket_of(np.asarray(counts), sizes)
        self.sizes, self.batch_size, self.seed, self.key = tuple(sizes), batch_size, seed, key
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skipped = 0, 0
        group = batch_size * num_replicas
        self.batches_per_bucket = {
            int(m): int((self.bucket == b).sum()) // group for b, m in enumerate(self.sizes)
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, num_batches: int) -> None:
        self.skipped = num_batches

    def __len__(self) -> int:
        return sum(self.batches_per_bucket.values()) - self.skipped

    def order(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches (global, batch_size * num_replicas indices each), in order."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, 2))
        group = self.batch_size * self.num_replicas
        batches = []
        for b in range(len(self.sizes)):
            members = rng.permutation(np.flatnonzero(self.bucket == b))
            full = len(members) // group * group  # drop_last per bucket
            batches += list(members[:full].reshape(-1, group))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[Any]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skipped = self.skipped, 0
        lo = self.rank * self.batch_size
        for batch in self.order(epoch)[skip:]:
            yield [self.key(int(i), epoch) for i in batch[lo : lo + self.batch_size]]
