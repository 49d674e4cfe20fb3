"""Fixed shapes on the host: one [3, H, W] canvas per image and exactly M boxes per image.

A shape-compiling device (Ascend NPU, torch.compile) compiles one graph per input shape, so
every batch must look the same: images `[B, 3, H, W]`, boxes `[B, M, 4]`, labels `[B, M]`,
a validity mask `[B, M]`. Units: images float32 in [0, 1] (uint8 0..255 with
`data.decode=reduced`, normalised on the device); boxes xyxy pixels.

The fits (stretch | letterbox | pad, padding only right and bottom so box coordinates stay
valid) live in `ssd_npu.data.fit` and are re-exported here (`fit_to_canvas`, `unfit_boxes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssd_npu.choices import Canvas
from ssd_npu.data.batch import PaddedBoxes
from ssd_npu.data.decode import DeferredImage
from ssd_npu.data.fit import (  # noqa: F401 (re-exported: the public names predate fit.py)
    FIT_MODES,
    FitInfo,
    content_size,
    empty_fit,
    fit_deferred,
    fit_to_canvas,
    unfit_boxes,
)


def pad_targets(
    boxes: Tensor, labels: Tensor, max_boxes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Pad or subsample to exactly `max_boxes` (M) rows.

    boxes [N, 4], labels [N] -> boxes [M, 4] float32, labels [M] int64, valid [M] bool,
    dropped = max(0, N - M). Real rows come first; padding rows are zeros / 0 / False.
    With N > M a random subset (torch.randperm with `generator`) is kept, in original order.
    """
    fields = {
        "boxes": boxes.as_subclass(Tensor).to(torch.float32).reshape(-1, 4),
        "labels": labels.as_subclass(Tensor).to(torch.int64),
    }
    padded, valid, dropped = pad_fields(fields, max_boxes, generator)
    return padded["boxes"], padded["labels"], valid, dropped


def pad_fields(
    fields: dict[str, Tensor], max_boxes: int, generator: torch.Generator
) -> tuple[dict[str, Tensor], Tensor, int]:
    """Every per-instance field of a target on exactly `max_boxes` (M) rows, one `valid` mask.

    fields: tensors sharing their first dim N, e.g. boxes [N, 4], labels [N], area [N],
    iscrowd [N], masks [N, H, W]. Returns ({name: [M, ...] same dtype, zero padding rows},
    valid [M] bool, dropped = max(0, N - M)). Real rows come first; with N > M the same
    random subset of rows (torch.randperm with `generator`, kept in original order) is taken
    from every field, so row i of each field still describes the same instance.
    """
    if not fields:
        raise ValueError("pad_fields: no fields given; pass at least boxes.")
    tensors = {name: t.as_subclass(Tensor) for name, t in fields.items()}
    sizes = {name: int(t.shape[0]) for name, t in tensors.items()}
    n = next(iter(sizes.values()))
    if any(size != n for size in sizes.values()):
        raise ValueError(f"pad_fields: per-instance fields differ in their first dim: {sizes}")
    if n > max_boxes:
        keep = torch.randperm(n, generator=generator)[:max_boxes].sort().values
        tensors = {name: t[keep] for name, t in tensors.items()}
    k = min(n, max_boxes)
    padded = {}
    for name, t in tensors.items():
        out = t.new_zeros((max_boxes, *t.shape[1:]))
        out[:k] = t
        padded[name] = out
    valid = torch.zeros(max_boxes, dtype=torch.bool)
    valid[:k] = True
    return padded, valid, n - k


def sample_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative-or-not integer keys (seed, image_id, epoch)."""
    return int(
        np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(2, np.uint64)[0] >> 1
    )


class FixSample:
    """Per-sample fixed-shape transform, run in the DataLoader worker after augmentation.

    (image, target) -> dict: image [3, H, W], boxes [M, 4] f32 canvas px, labels [M] i64,
    valid [M] bool, image_id, orig_size (h, w), content_size (h, w), scale (sx, sy),
    boxes_dropped, degenerate, downscaled, skipped. image: uint8 [3, h, w] (data.decode=exact)
    gives float32 in [0, 1] (`fit_to_canvas`, torchvision's pixels); a `DeferredImage`
    (data.decode=reduced) gives uint8 0..255 (`fit_deferred`). The subset generator is seeded
    from (seed, image_id, epoch), so the result does not depend on the worker count.
    """

    def __init__(
        self,
        canvas: Any,
        max_boxes: int,
        fit: str = "stretch",
        pad_value: float = 0.0,
        seed: int = 0,
    ):
        self.canvas = Canvas.of(canvas)
        self.max_boxes, self.fit, self.pad_value, self.seed = (
            int(max_boxes),
            fit,
            float(pad_value),
            int(seed),
        )

    def __call__(self, image: Any, target: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        skipped = int(target.get("skipped", 0))
        labels = target["labels"]
        if isinstance(image, DeferredImage):
            fitted = fit_deferred(image, target["boxes"], self.canvas, self.fit, self.pad_value)
            if fitted is None:  # a corrupt file with on_bad_image=skip: an empty sample, counted
                fitted = empty_fit(image, self.canvas, self.pad_value)
                labels, skipped = labels[:0], skipped + 1
            img, boxes, info = fitted
        else:
            img, boxes, info = fit_to_canvas(
                image, target["boxes"], self.canvas, self.fit, self.pad_value
            )
        gen = torch.Generator().manual_seed(sample_seed(self.seed, int(target["image_id"]), epoch))
        boxes, labels, valid, dropped = pad_targets(boxes, labels, self.max_boxes, gen)
        return {
            "image": img,
            "boxes": boxes,
            "labels": labels,
            "valid": valid,
            "image_id": int(target["image_id"]),
            "orig_size": info.orig_size,
            "content_size": info.content_size,
            "scale": info.scale,
            "boxes_dropped": dropped,
            "degenerate": int(target.get("degenerate", 0)),
            "clipped": int(target.get("clipped", 0)),
            "downscaled": int(info.downscaled),
            "skipped": skipped,
        }


@dataclass
class FixedBatch(PaddedBoxes):
    """A batch with static shapes. image_ids -1 mark padding samples (last val batch)."""

    images: Tensor  # [B, 3, H, W] float32 in [0, 1]; uint8 0..255 with data.decode=reduced
    boxes: Tensor  # [B, M, 4] float32 xyxy canvas pixels
    labels: Tensor  # [B, M] int64 category ids, 0 on padding rows
    valid: Tensor  # [B, M] bool
    image_ids: Tensor  # [B] int64
    orig_sizes: Tensor  # [B, 2] int64 (h, w) of the fitted image (the original when not augmented)
    content_sizes: Tensor  # [B, 2] int64 (h, w) of the image inside the canvas
    scales: Tensor  # [B, 2] float32 (sx, sy): canvas = orig * scale
    boxes_dropped: int = 0
    degenerate: int = 0
    clipped: int = 0
    downscaled: int = 0
    skipped: int = 0

    def fit_info(self, i: int) -> FitInfo:
        """FitInfo of sample i, e.g. for `unfit_boxes` in evaluation."""
        sx, sy = self.scales[i].tolist()
        return FitInfo(
            (sx, sy),
            tuple(self.orig_sizes[i].tolist()),
            tuple(self.content_sizes[i].tolist()),
            False,
        )


def collate_fixed(samples: list[dict[str, Any]], buckets: Any = None) -> FixedBatch:
    """Stack FixSample outputs into a FixedBatch.

    buckets: sorted box-count buckets (FixSample padded to the largest); the target rows are cut
    to the smallest bucket holding the batch's largest valid count, so M only takes bucket
    values. Valid rows come first (pad_targets), so the cut removes padding only.
    """
    valid = torch.stack([s["valid"] for s in samples])
    m = valid.shape[1]
    if buckets:
        most = int(valid.sum(1).max())
        m = next((b for b in buckets if b >= most), m)
    return FixedBatch(
        images=torch.stack([s["image"] for s in samples]),
        boxes=torch.stack([s["boxes"][:m] for s in samples]),
        labels=torch.stack([s["labels"][:m] for s in samples]),
        valid=valid[:, :m],
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
        content_sizes=torch.tensor([s["content_size"] for s in samples], dtype=torch.int64),
        scales=torch.tensor([s["scale"] for s in samples], dtype=torch.float32),
        **summed_counters(samples),
    )


# Per-sample counters a collate sums (a padding sample carries zeros: data.loader)
SAMPLE_COUNTERS = ("boxes_dropped", "degenerate", "clipped", "downscaled", "skipped")


def summed_counters(
    samples: list[dict[str, Any]], names: tuple[str, ...] = SAMPLE_COUNTERS
) -> dict[str, int]:
    """{counter: its sum over the samples} (0 where a sample has no such counter)."""
    return {name: sum(int(s.get(name, 0)) for s in samples) for name in names}
