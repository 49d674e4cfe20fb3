"""DataLoaders for either path: how samples become batches comes in as a `BatchForm` (the fixed
path's FixSample + collate_fixed, or the dynamic baseline's), built once in `ssd_npu.build`.

Determinism: every sample's randomness (augmentation, box subset) is seeded from
(seed, image_id, epoch), so the same seed gives the same batches whatever num_workers is
(the epoch travels with each index: `ssd_npu.data.samplers.SampleKey`).
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ssd_npu.data.buckets import BucketBatchSampler
from ssd_npu.data.coco import CocoDetectionDataset, check_num_classes
from ssd_npu.data.fixed_shape import SAMPLE_COUNTERS, sample_seed
from ssd_npu.data.samplers import (
    EpochSampler,
    PaddedSequentialSampler,
    ResumableSampler,
    SampleKey,
)
from ssd_npu.data.transforms import train_augmentation
from ssd_npu.errors import DataError


class SampleDataset(Dataset):
    """base[i] -> augment (seeded per sample) -> finish (FixSample or to_dynamic_sample)."""

    def __init__(
        self,
        base: CocoDetectionDataset,
        augment: Callable | None,
        finish: Callable[..., dict[str, Any]],
        seed: int,
    ) -> None:
        self.base, self.augment, self.finish, self.seed = base, augment, finish, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
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
                # the CPU generator only: torch.manual_seed also queues a CUDA seed on a CUDA
                # build (0.15-0.8 ms per sample); the CPU stream is the same either way
                torch.default_generator.manual_seed(
                    sample_seed(self.seed, target["image_id"], key.epoch, 1)
                )
                image, target = self.augment(image, target)
        sample = self.finish(image, target, key.epoch)
        if key.pad:
            sample["image_id"] = -1
            # a repeated (padding) sample must not count twice
            for k in SAMPLE_COUNTERS:
                sample[k] = 0
        return sample


def _worker_init(worker_id: int) -> None:
    # The objects inherited from the main process (the val set's pycocotools index, ...):
    # out of the collector's reach, so a full collection here does not write to (and so
    # copy) every page they lie on. freeze() only moves list heads: no page is touched.
    gc.freeze()
    # DataLoader seeds torch per worker; python and numpy too, for any code that uses them
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@dataclass(frozen=True)
class BatchForm:
    """How one path turns decoded samples into batches (`ssd_npu.build` builds one per path).

    finish(image, target, epoch) -> sample dict (fixed: `FixSample`; dynamic: unchanged sizes);
    collate(list of samples) -> FixedBatch | DynamicBatch. `static`: every batch has exactly
    batch_size samples (train drops its last partial batch, val fills its last one with repeats
    whose image_id is -1), as a shape-compiling device needs. `buckets`: box-count buckets
    (sorted M values) when train batches are grouped by box count, else None. `train_finish`
    and `train_collate`, when given, make the train batches instead (`SlotBatch`es for the
    device augmentation); evaluation keeps `finish` and `collate`.
    """

    finish: Callable[..., dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], Any]
    static: bool
    buckets: tuple[int, ...] | None = None
    # data.augment_on=device: the train set's own finish and collate (`SlotSample`,
    # `collate_slots`); its augmentation then runs on the device, not in the workers
    train_finish: Callable[..., dict[str, Any]] | None = None
    train_collate: Callable[[list[dict[str, Any]]], Any] | None = None


@dataclass(frozen=True)
class LoaderSpec:
    """What the loaders are built from besides the batch form (build.py fills it from the
    config)."""

    batch_size: int  # per rank
    num_classes: int  # including background
    train_split: str = "train2017"
    val_split: str = "val2017"
    on_bad_image: str = "fail"
    augment: bool = True
    num_workers: int = 2
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False  # page-locked batches for asynchronous copies (cuda / npu)
    decode: str = "exact"  # exact | reduced (fixed path only: ssd_npu.data.decode)
    recipe: str = "ssdlite"  # the model's training augmentation (ssd_npu.data.transforms)


@dataclass
class Loaders:
    """The built loaders; `train_sampler` is what the loop positions on resume."""

    train: DataLoader
    val: DataLoader
    train_sampler: ResumableSampler
    train_set: CocoDetectionDataset
    val_set: CocoDetectionDataset


def _bucket_batches(
    spec: LoaderSpec, buckets: tuple[int, ...], train_ds: CocoDetectionDataset
) -> BucketBatchSampler:
    """Box-count bucket batches for max_boxes=[...], from the annotation counts (no decoding)."""
    batches = BucketBatchSampler(
        train_ds.box_counts,  # counted when the data set read its file: no second parse
        buckets,
        spec.batch_size,
        spec.seed,
        SampleKey,
        spec.world_size,
        spec.rank,
    )
    if len(batches) == 0:
        raise DataError(
            f"max_boxes={list(buckets)}: no bucket of {train_ds.ann_file} holds a full "
            f"batch of {spec.batch_size * spec.world_size} images; lower batch_size or use "
            "fewer buckets."
        )
    return batches


def build_loaders(spec: LoaderSpec, form: BatchForm, data_root: Path) -> Loaders:
    """Train and val loaders whose batches `form` makes.

    `form.static`: every train and val batch has exactly batch_size samples (train drops the
    last partial batch; val fills it with repeats whose image_ids are -1); else val's last
    batch may be smaller. Several ranks (`world_size`): train takes this rank's share of a
    DistributedSampler (or of the bucket batches); val is sharded too (every rank's detections
    are gathered before COCOeval). `form.buckets`: each train batch comes from one bucket and
    its M is cut to that bucket (by `form.collate`); val batches too (in order, so their M is
    any bucket value).
    """
    reading = {"on_bad_image": spec.on_bad_image, "decode": spec.decode}
    train_ds = CocoDetectionDataset(data_root, spec.train_split, **reading)
    # data.decode=device is the train slots' (the host fits the val images: it decodes them)
    val_reading = {**reading, "decode": "exact" if spec.decode == "device" else spec.decode}
    # evaluation's ground truth: val keeps its pycocotools index (built from the same parse)
    val_ds = CocoDetectionDataset(data_root, spec.val_split, **val_reading, ground_truth=True)
    check_num_classes(train_ds, spec.num_classes)
    check_num_classes(val_ds, spec.num_classes)
    finish, collate = form.finish, form.collate
    on_host = form.train_finish is None  # else the device augments (data.augment_on=device)
    augment = train_augmentation(spec.recipe) if spec.augment and on_host else None
    train_set = SampleDataset(train_ds, augment, form.train_finish or finish, spec.seed)
    val_set = SampleDataset(val_ds, None, finish, spec.seed)
    bs = spec.batch_size
    if len(train_set) < bs:
        raise DataError(
            f"{train_ds.ann_file} has {len(train_set)} images, fewer than batch_size={bs}; "
            "lower batch_size or use more data."
        )
    common: dict[str, Any] = {
        "num_workers": spec.num_workers,
        "persistent_workers": spec.num_workers > 0,
        "pin_memory": spec.pin_memory,
        "worker_init_fn": _worker_init,
    }
    train_common = {**common, "collate_fn": form.train_collate or collate}
    # The DataLoader's own generator only draws worker base seeds; the shuffle order is a
    # function of (seed, epoch) alone, so a resumed run sees the same order.
    gen = torch.Generator().manual_seed(spec.seed)
    if form.buckets is not None:
        train_sampler: ResumableSampler = _bucket_batches(spec, form.buckets, train_ds)
        train = DataLoader(train_set, batch_sampler=train_sampler, generator=gen, **train_common)
    else:
        # one process is a DistributedSampler with a single replica: the same order rule
        inner = DistributedSampler(
            train_set,
            num_replicas=spec.world_size,
            rank=spec.rank,
            shuffle=True,
            seed=spec.seed,
            drop_last=True,
        )
        train_sampler = EpochSampler(inner, bs)
        train = DataLoader(
            train_set,
            batch_size=bs,
            sampler=train_sampler,
            drop_last=True,
            generator=gen,
            **train_common,
        )
    val_sampler: Sampler | list[SampleKey]
    if form.static:
        val_sampler = PaddedSequentialSampler(len(val_set), bs, spec.rank, spec.world_size)
    else:
        val_sampler = [SampleKey(i) for i in range(spec.rank, len(val_set), spec.world_size)]
    val = DataLoader(
        val_set, batch_size=bs, sampler=val_sampler, drop_last=False, collate_fn=collate, **common
    )
    return Loaders(train, val, train_sampler, train_ds, val_ds)
