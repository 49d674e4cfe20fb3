"""Box-count buckets: `max_boxes=[16,32,64]` pads each batch to the smallest bucket that holds it.

One `max_boxes` is a trade: large enough for the busiest image means most target rows are
padding the device computes on for nothing. With buckets, every batch is padded to the
smallest bucket holding its largest image's box count, so the device sees at most
len(buckets) target shapes (`boxes [B, M, 4]`, M in buckets) while padding falls.

`BucketBatchSampler` keeps buckets full: per epoch it puts each image in the bucket of its
annotation box count (after crowd/degenerate filtering; augmentation only removes boxes, so
the bucket still holds the sample), shuffles within buckets, forms full batches per bucket
(the last partial batch of each bucket is dropped) and shuffles the batch order. The order is
a function of (seed, epoch) alone, so a resumed run re-enters an epoch exactly (`skip_next`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from ssd_npu.compiler import graphs_compiled
from ssd_npu.data.recommend import bucket_of as bucket_index  # one rule for report and sampler


def bucket_sizes(max_boxes: Any) -> tuple[int, ...]:
    """`max_boxes` as sorted bucket sizes: 32 -> (32,); [16, 32] -> (16, 32)."""
    if isinstance(max_boxes, int):
        return (int(max_boxes),)
    return tuple(int(v) for v in max_boxes)


class BucketBatchSampler(Sampler):
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
        self.bucket = bucket_index(np.asarray(counts), sizes)
        self.sizes, self.batch_size, self.seed, self.key = tuple(sizes), batch_size, seed, key
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0
        group = batch_size * num_replicas
        self.batches_per_bucket = {
            int(m): int((self.bucket == b).sum()) // group for b, m in enumerate(self.sizes)
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, num_indices: int) -> None:
        """Skip the first num_indices samples (whole batches) of the next pass, as EpochSampler."""
        self.skip = num_indices // self.batch_size

    def __len__(self) -> int:
        return sum(self.batches_per_bucket.values()) - self.skip

    def order(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches (global, batch_size * num_replicas indices each), in order."""
        from ssd_npu.data.fixed_shape import sample_seed  # fixed_shape imports torch: lazily

        rng = np.random.default_rng(sample_seed(self.seed, epoch, 2))
        group = self.batch_size * self.num_replicas
        batches = []
        for b in range(len(self.sizes)):
            members = rng.permutation(np.flatnonzero(self.bucket == b))
            full = len(members) // group * group  # drop_last per bucket
            batches += list(members[:full].reshape(-1, group))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skip = self.skip, 0
        lo = self.rank * self.batch_size
        for batch in self.order(epoch)[skip:]:
            yield [self.key(int(i), epoch) for i in batch[lo : lo + self.batch_size]]


class BucketCounter:
    """Wraps a step function; counts batches and graphs compiled per bucket (boxes.shape[1]).

    Graphs are dynamo's `unique_graphs` delta across each call, so a bucket's count is what
    its first batch compiled (plus any recompile later in that bucket).
    """

    def __init__(self, step_fn: Callable, sizes: Sequence[int], count_graphs: bool) -> None:
        self.step_fn, self.sizes, self.count_graphs = step_fn, tuple(sizes), count_graphs
        self.batches = {m: 0 for m in self.sizes}
        self.graphs = {m: 0 for m in self.sizes}
        self.compiled = getattr(step_fn, "compiled", None)

    def __call__(self, batch: Any) -> Any:
        m = int(batch.boxes.shape[1])
        before = graphs_compiled() if self.count_graphs else 0
        try:
            return self.step_fn(batch)
        finally:
            self.batches[m] = self.batches.get(m, 0) + 1
            if self.count_graphs:
                self.graphs[m] = self.graphs.get(m, 0) + graphs_compiled() - before

    def summary(self) -> dict[str, Any]:
        """summary.json's `buckets`: sizes, batches per bucket, graphs per bucket (or None)."""
        return {
            "sizes": list(self.sizes),
            "batches": {str(m): n for m, n in self.batches.items()},
            "graphs": {str(m): n for m, n in self.graphs.items()} if self.count_graphs else None,
        }
