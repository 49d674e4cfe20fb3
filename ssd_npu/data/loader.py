"""DataLoaders for the fixed path (FixedBatch, static shapes) and the dynamic baseline.

Determinism: every sample's randomness (augmentation, box subset) is seeded from
(cfg.seed, image_id, epoch), so the same seed gives the same batches whatever num_workers is.
The epoch travels with each index: the sampler yields `SampleKey(index, epoch, pad)`, because
a counter kept inside (persistent) workers would depend on which worker saw which image.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ssd_npu.data.buckets import BucketBatchSampler, bucket_sizes
from ssd_npu.data.coco import CocoDetectionDataset, check_num_classes
from ssd_npu.data.dynamic import collate_dynamic, to_dynamic_sample
from ssd_npu.data.fixed_shape import FixSample, collate_fixed, sample_seed
from ssd_npu.data.report import box_table
from ssd_npu.data.synthetic import ensure_synthetic_coco
from ssd_npu.data.transforms import train_augmentation
from ssd_npu.errors import DataError


class SampleKey(NamedTuple):
    index: int
    epoch: int = 0
    pad: bool = False  # a repeated sample that only fills the last batch (image_id -> -1)


class EpochSampler(Sampler):
    """Wraps a sampler; yields SampleKey(i, epoch) and counts epochs (calls inner.set_epoch).

    The inner sampler's order is a function of (seed, epoch) alone (DistributedSampler), so
    a resumed run can re-enter an epoch: `skip_next(n)` drops the first n indices of the
    next pass (the batches an interrupted run already trained on).
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner, self.epoch, self.skip = inner, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, num_indices: int) -> None:
        self.skip = num_indices

    def __len__(self) -> int:
        return len(self.inner) - self.skip

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skip = self.skip, 0
        self.inner.set_epoch(epoch)  # DistributedSampler reshuffles per epoch
        for position, i in enumerate(self.inner):
            if position >= skip:
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

    def __iter__(self):
        for i in range(self.total):
            yield SampleKey(self.share[i % len(self.share)], 0, i >= self.real)


class SampleDataset(Dataset):
    """base[i] -> augment (seeded per sample) -> finish (FixSample or to_dynamic_sample)."""

    def __init__(self, base: CocoDetectionDataset, augment: Any, finish: Any, seed: int) -> None:
        self.base, self.augment, self.finish, self.seed = base, augment, finish, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        key = key if isinstance(key, SampleKey) else SampleKey(int(key))
        threads = torch.get_num_threads()
        # CPU bilinear interpolation rounds differently with more threads (1 ulp); workers run
        # one thread, so the main process (num_workers=0) does too, for identical batches
        torch.set_num_threads(1)
        try:
            return self._sample(key)
        finally:
            torch.set_num_threads(threads)

    def _sample(self, key: SampleKey) -> dict[str, Any]:
        image, target = self.base[key.index]
        if self.augment is not None:
            # torch's global generator drives v2's randomness: fork it so the main process's
            # stream is untouched (num_workers=0) and seed it from the sample, not the worker
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, target["image_id"], key.epoch, 1))
                image, target = self.augment(image, target)
        sample = self.finish(image, target, key.epoch)
        if key.pad:
            sample["image_id"] = -1
            for k in ("boxes_dropped", "degenerate", "clipped", "downscaled", "skipped"):
                sample[k] = 0  # counters must not count a repeated image twice
        return sample


def _worker_init(worker_id: int) -> None:
    # DataLoader seeds torch per worker; python and numpy too, for any code that uses them
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def resolve_data_root(cfg: Any) -> Path:
    """The data set folder: the synthetic cache (generated on first use) or data.root for coco."""
    if cfg.data.name == "synthetic":
        root = Path(cfg.data.root) if cfg.data.root else None
        if root is not None and (root / "annotations").is_dir():
            return root  # a set made by scripts/make_synthetic_coco.py: use it as it is
        return ensure_synthetic_coco(root, cfg.data.synthetic)
    root = Path(str(cfg.data.root)).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={root} does not exist; give a COCO folder with annotations/ and "
            f"{cfg.data.train_split}/, {cfg.data.val_split}/ inside."
        )
    return root


def _bucket_batches(
    cfg: Any, train_ds: CocoDetectionDataset, sizes: tuple[int, ...], distributed: bool
) -> BucketBatchSampler:
    """Box-count bucket batches for max_boxes=[...], from the annotation counts (no decoding)."""
    world, rank = (
        (torch.distributed.get_world_size(), torch.distributed.get_rank())
        if distributed
        else (1, 0)
    )
    counts = box_table(train_ds.coco, train_ds.ids).counts
    batches = BucketBatchSampler(
        counts, sizes, int(cfg.batch_size), int(cfg.seed), SampleKey, world, rank
    )
    if len(batches) == 0:
        raise DataError(
            f"max_boxes={list(sizes)}: no bucket of {train_ds.ann_file} holds a full batch of "
            f"{cfg.batch_size * world} images; lower batch_size or use fewer buckets."
        )
    return batches


def build_loaders(
    cfg: Any, data_root: Path, shape: str, distributed: bool = False
) -> tuple[DataLoader, DataLoader, CocoDetectionDataset, CocoDetectionDataset]:
    """(train_loader, val_loader, train_dataset, val_dataset).

    shape="fixed": loaders yield FixedBatch; every train and val batch has exactly
    cfg.batch_size samples (train drops the last partial batch; val pads it with repeats whose
    image_ids are -1). shape="dynamic": DynamicBatch; val's last batch may be smaller.
    distributed: DistributedSampler for train (drop_last, seed=cfg.seed; the epoch is set
    automatically on every pass); val is not sharded (each rank sees the whole val set).
    max_boxes=[...] (buckets, fixed only): train batches come from `BucketBatchSampler` (one
    bucket per batch, `loader.batch_sampler` keeps the epoch and `skip_next`) and every batch's
    M is cut to its bucket; val batches too (in order, so their M is any bucket value).
    """
    if shape not in ("fixed", "dynamic"):
        raise ValueError(f"shape={shape!r}; choose fixed or dynamic")
    on_bad = cfg.data.on_bad_image
    train_ds = CocoDetectionDataset(data_root, cfg.data.train_split, on_bad_image=on_bad)
    val_ds = CocoDetectionDataset(data_root, cfg.data.val_split, on_bad_image=on_bad)
    check_num_classes(train_ds, cfg.data.num_classes)
    check_num_classes(val_ds, cfg.data.num_classes)
    sizes = bucket_sizes(cfg.max_boxes)
    if shape == "fixed":
        # buckets: samples are padded to the largest, each batch cut to its bucket on collate
        finish = FixSample(cfg.canvas, sizes[-1], cfg.fit, cfg.pad_value, cfg.seed)
        collate = partial(collate_fixed, buckets=sizes) if len(sizes) > 1 else collate_fixed
    else:
        finish, collate = to_dynamic_sample, collate_dynamic
    augment = train_augmentation() if cfg.augment else None
    train_set = SampleDataset(train_ds, augment, finish, cfg.seed)
    val_set = SampleDataset(val_ds, None, finish, cfg.seed)
    bs, workers = int(cfg.batch_size), int(cfg.num_workers)
    if len(train_set) < bs:
        raise DataError(
            f"{train_ds.ann_file} has {len(train_set)} images, fewer than batch_size={bs}; "
            "lower batch_size or use more data."
        )
    # The shuffle order is a function of (seed, epoch) only, so a resumed run sees the same
    # order; one process is a DistributedSampler with a single replica. The DataLoader's own
    # generator only draws worker base seeds.
    gen = torch.Generator().manual_seed(int(cfg.seed))
    replicas = {} if distributed else {"num_replicas": 1, "rank": 0}
    inner = DistributedSampler(
        train_set, shuffle=True, seed=int(cfg.seed), drop_last=True, **replicas
    )
    common = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": False,
        "worker_init_fn": _worker_init,
        "collate_fn": collate,
    }
    if shape == "fixed" and len(sizes) > 1:
        train_loader = DataLoader(
            train_set,
            batch_sampler=_bucket_batches(cfg, train_ds, sizes, distributed),
            generator=gen,
            **common,
        )
    else:
        train_loader = DataLoader(
            train_set,
            batch_size=bs,
            sampler=EpochSampler(inner),
            drop_last=True,
            generator=gen,
            **common,
        )
    # Evaluation is sharded over ranks (every rank's detections are gathered before COCOeval).
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if shape == "fixed":
        val_sampler: Sampler = PaddedSequentialSampler(len(val_set), bs, rank, world)
    else:
        val_sampler = [SampleKey(i) for i in range(rank, len(val_set), world)]
    val_loader = DataLoader(val_set, batch_size=bs, sampler=val_sampler, drop_last=False, **common)
    return train_loader, val_loader, train_ds, val_ds
