"""The dynamic baseline's samples and batches: torchvision's own ragged input, unpadded.

Each image keeps its own size [3, h, w] and its own number of boxes, as torchvision's
detection models take them (a list of images and a list of target dicts); the fixed-shape
path that replaces it is `ssd_npu.data.fixed_shape`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import to_dtype

from ssd_npu.data.batch import HostCounts, TensorFields, data_counts


def to_dynamic_sample(image: Tensor, target: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
    """The baseline sample: float image [3, h, w] in [0, 1], unpadded boxes [N, 4] image px."""
    return {
        "image": to_dtype(image.as_subclass(Tensor), torch.float32, scale=True),
        "boxes": target["boxes"].as_subclass(Tensor).to(torch.float32),
        "labels": target["labels"].to(torch.int64),
        "image_id": int(target["image_id"]),
        "orig_size": tuple(int(v) for v in image.shape[-2:]),
        "degenerate": int(target.get("degenerate", 0)),
        "clipped": int(target.get("clipped", 0)),
        "skipped": int(target.get("skipped", 0)),
    }


@dataclass
class DynamicBatch(TensorFields):
    """torchvision's own input: a list of images of any size and a list of target dicts."""

    images: list[Tensor]  # [3, h_i, w_i] float32 in [0, 1]
    targets: list[dict[str, Tensor]]  # boxes [N_i, 4] float32 xyxy image px, labels [N_i] int64
    image_ids: Tensor  # [B] int64
    orig_sizes: Tensor  # [B, 2] int64 (h, w)
    degenerate: int = 0
    clipped: int = 0
    skipped: int = 0

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> DynamicBatch:
        """The tensor fields, every image of the list and every target dict's tensors."""
        super().map_tensors(fn)
        self.images = [fn(image) for image in self.images]
        self.targets = [{key: fn(t) for key, t in target.items()} for target in self.targets]
        return self

    def host_counts(self) -> HostCounts:
        return HostCounts(len(self.image_ids), None, 0, data_counts(self))


def collate_dynamic(samples: list[dict[str, Any]]) -> DynamicBatch:
    """Collect `to_dynamic_sample` outputs into a DynamicBatch (no stacking)."""
    return DynamicBatch(
        images=[s["image"] for s in samples],
        targets=[{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
        degenerate=sum(s["degenerate"] for s in samples),
        clipped=sum(s["clipped"] for s in samples),
        skipped=sum(s["skipped"] for s in samples),
    )
