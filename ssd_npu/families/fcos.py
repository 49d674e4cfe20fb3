"""The FCOS family (fcos_resnet50_fpn): `FCOS.compute_loss` and `FCOS.postprocess_detections`
in fixed shapes.

Head: cls_logits [B, A, C] (no background column), bbox_regression [B, A, 4] (distances to
the sides over the anchor size, >= 0), bbox_ctrness [B, A, 1]; one anchor per location.
Loss (`ssd_npu.loss.fcos`): sigmoid focal + GIoU + centerness BCE, each over the foreground
locations of the (global) batch. Postprocess, per FPN level as `FCOS.forward` splits it:
score sqrt(sigmoid(logit) x sigmoid(centerness)) per (location, class), the pairs above
score_thresh, the top min(A_l x C, topk_candidates) of those, boxes decoded with
`BoxLinearCoder` and clipped; batched NMS over all levels; the first detections_per_img.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxLinearCoder

from ssd_npu.families.base import Head, Levels, Reduce, Sums, Targets, torchvision_postprocess
from ssd_npu.loss.fcos import FCOSLossOptions, fcos_loss_sums, fcos_normalise
from ssd_npu.models.nms import compute_dtype, fixed_batched_nms
from ssd_npu.models.postprocess import (
    Detections,
    Recipe,
    clip_to_canvas,
    recipe_of,
    top_pairs,
    zero_invalid,
)
from ssd_npu.models.specs import EvalRecipe, SGDRecipe

if TYPE_CHECKING:
    from ssd_npu.models.detector import FixedDetector
    from ssd_npu.models.specs import ModelSpec


@dataclass(frozen=True)
class FCOSLoss:
    """`fcos_loss_sums` -> (focal sum, GIoU sum, centerness sum, foreground locations),
    scalars over the batch; normalised by the foreground count of the global batch."""

    options: FCOSLossOptions = field(default_factory=FCOSLossOptions)

    def sums(self, head: Head, anchors: Tensor, per_level: Levels, targets: Targets) -> Sums:
        return fcos_loss_sums(head, anchors, per_level, *targets, self.options)

    def normalise(self, sums: Sums, num_images: int, reduce: Reduce) -> dict[str, Tensor]:
        *loss_sums, num_foreground = sums
        return fcos_normalise(*loss_sums, reduce(num_foreground))


class FCOSFamily:
    name = "fcos"
    outputs = ("cls_logits", "bbox_regression", "bbox_ctrness")
    eval_recipe = EvalRecipe(0.2, 0.6, 100, 1000)  # `FCOS`'s defaults
    train_recipe = "hflip"
    sgd_recipe = SGDRecipe(0.01, 16, 1e-4)  # --lr 0.01, 8 GPUs x 2 images, default decay

    def loss(self, spec: ModelSpec) -> FCOSLoss:
        return FCOSLoss()  # fcos_resnet50_fpn: torchvision's defaults (radius 1.5)

    def host_postprocess(self, model: FixedDetector, head: Head) -> list[dict[str, Tensor]]:
        return torchvision_postprocess(model, self.outputs, head, per_level=True)

    def device_postprocess(self, model: FixedDetector, head: Head) -> Detections:
        return fcos_postprocess(
            head, model.anchors, model.anchors_per_level, model.canvas,
            model.detector.box_coder, recipe_of(model.detector),
        )  # fmt: skip


def fcos_postprocess(
    head: Head,
    anchors: Tensor,
    anchors_per_level: Levels,
    canvas: tuple[int, int],
    box_coder: BoxLinearCoder,
    recipe: Recipe,
) -> Detections:
    """`FCOS.postprocess_detections` with static shapes.

    head: cls_logits [B, A, C], bbox_regression [B, A, 4], bbox_ctrness [B, A, 1]; anchors
    [A, 4] xyxy canvas px; anchors_per_level [A_l, ...] summing to A; canvas (H, W) ->
    Detections [B, D], labels 0..C-1, boxes canvas px.
    """
    dtype = compute_dtype(head[0].dtype)
    split = list(anchors_per_level)
    per_output = [t.to(dtype).split(split, dim=1) for t in head]
    levels = zip(*per_output, anchors.to(dtype).split(split, dim=0), strict=True)
    parts = [fcos_level_candidates(*level, canvas, box_coder, recipe) for level in levels]
    boxes, scores, labels, valid = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
    keep, keep_valid = fixed_batched_nms(
        boxes, scores, labels, recipe.nms_thresh, recipe.detections_per_img, valid
    )
    # one gather for the three: labels (< 2^24) are exact in the float columns
    packed = torch.cat([boxes, scores[..., None], labels[..., None].to(dtype)], dim=-1)
    kept = zero_invalid(packed.gather(1, keep[..., None].expand(-1, -1, 6)), keep_valid)
    return Detections(kept[..., :4], kept[..., 4], kept[..., 5].long(), keep_valid)


def fcos_level_candidates(
    logits: Tensor,
    regression: Tensor,
    ctrness: Tensor,
    anchors: Tensor,
    canvas: tuple[int, int],
    box_coder: BoxLinearCoder,
    recipe: Recipe,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level: logits [B, A_l, C], regression [B, A_l, 4], ctrness [B, A_l, 1], anchors
    [A_l, 4] -> the top k = min(A_l x C, topk_candidates) (location, class) pairs above
    score_thresh: boxes [B, k, 4] decoded and clipped, scores [B, k] descending, labels
    [B, k], valid [B, k] (the pairs at or below the threshold sort last, marked invalid)."""
    # anchor-major (location, class) pairs, as torchvision flattens them
    scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctrness)).flatten(1)
    top, location, labels, valid = top_pairs(scores, logits.shape[-1], recipe)
    distances = regression.gather(1, location[..., None].expand(-1, -1, 4))
    boxes = clip_to_canvas(box_coder.decode(distances, anchors[location]), canvas)
    return boxes, top, labels, valid


FCOS = FCOSFamily()
