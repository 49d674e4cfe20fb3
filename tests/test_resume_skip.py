"""Resume at train2017's size: the sampler's skip reads no sample and lands on the same batches."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssd_npu.data.buckets import BucketBatchSampler
from ssd_npu.data.samplers import EpochSampler, SampleKey

N = 118_287  # train2017's images
BATCH = 8


class CountingSet(Dataset):
    """Stands for the training set: counts the samples read (each one a decode in training)."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: SampleKey) -> int:
        self.reads += 1
        return key.index * 1000 + key.epoch  # index and epoch, one int


def _epoch_sampler(data: CountingSet) -> EpochSampler:
    inner = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    return EpochSampler(inner, BATCH)


def test_epoch_sampler_resumes_mid_epoch_without_reading_skipped_samples():
    data = CountingSet(N)
    straight = _epoch_sampler(data)
    straight.set_epoch(3)
    order = [k.index * 1000 + k.epoch for k in straight]  # the uninterrupted epoch 3
    done = 9_001  # batches an interrupted run trained on in epoch 3
    resumed = _epoch_sampler(data)
    resumed.set_epoch(3)
    resumed.skip(done)
    loader = DataLoader(data, batch_size=BATCH, sampler=resumed, drop_last=True)
    assert len(loader) == N // BATCH - done
    batches = list(itertools.islice(iter(loader), 3))
    for j, batch in enumerate(batches):
        start = (done + j) * BATCH
        assert batch.tolist() == order[start : start + BATCH]
    assert data.reads == 3 * BATCH  # the first next batch is the first read
    assert torch.is_tensor(batches[0])


def test_bucket_sampler_resumes_mid_epoch_without_reading_skipped_samples():
    counts = np.random.default_rng(0).geometric(1 / 8.6, N) - 1
    data = CountingSet(N)
    make = lambda: BucketBatchSampler(counts, (8, 16, 64), BATCH, seed=2, key=SampleKey)  # noqa: E731
    straight = make()
    straight.set_epoch(1)
    order = [[k.index for k in batch] for batch in straight]
    done = len(order) // 2
    resumed = make()
    resumed.set_epoch(1)
    resumed.skip(done)
    loader = DataLoader(data, batch_sampler=resumed)
    assert len(loader) == len(order) - done
    for j, batch in enumerate(itertools.islice(iter(loader), 3)):
        assert [v // 1000 for v in batch.tolist()] == order[done + j]
        assert {v % 1000 for v in batch.tolist()} == {1}  # the epoch travels with each key
    assert data.reads == 3 * BATCH
