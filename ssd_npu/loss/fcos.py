"""The FCOS loss with no data-dependent shape.

torchvision's `FCOS.compute_loss` matches each image on its own (a `[A, M]` match matrix of
one column per ground-truth box), and `FCOSHead.compute_loss` selects the foreground
locations with boolean indexing and reads their count with `.item()`: every step has new
shapes and a host sync. Here the ground truth is padded to `M` rows with a `valid` mask and
every operation keeps its full `[B, A, ...]` shape; masks and sums select what torchvision's
indexing selects, so the values and gradients are the same (to float32 rounding: only the
order of the summation differs).

Matching, as torchvision's (one anchor per location, its size = 8 x the level's stride): a
location may take a box when its centre lies within `center_sampling_radius` x anchor size
of the box centre (Chebyshev distance), strictly inside the box, and the largest of its four
distances to the box sides lies strictly within the level's range (anchor size x [4, 8]; the
first level from 0, the last to inf). Of the boxes it may take, it takes the smallest: the
maximum of `match x (1e8 - area)`, first index on ties, computed in the same dtype as
torchvision's so that areas which round alike there tie alike here.

Normalisation, as `FCOSHead.compute_loss`: the three sums (sigmoid focal over every location
and class, GIoU and centerness BCE over the foreground) are divided by max(1, foreground
locations in the batch), like SSD's; under DDP pass the all-reduced count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.ops import sigmoid_focal_loss

from ssd_npu.loss.common import clean_padding, gather_matched, iou_loss

# torchvision's `pairwise_match * (1e8 - areas)`: an unmatched pair scores 0, a matched one
# more the smaller its box; below this, no box matched
_AREA_CEILING = 1e8
_UNMATCHED_BELOW = 1e-5


def fcos_box_coder() -> BoxLinearCoder:
    """torchvision's FCOS box coding: distances to the four sides over the anchor's size."""
    return BoxLinearCoder(normalize_by_size=True)


@dataclass(frozen=True)
class FCOSLossOptions:
    """How `fcos_loss_sums` computes torchvision's `FCOS.compute_loss`; the defaults are
    fcos_resnet50_fpn's."""

    box_coder: BoxLinearCoder = field(default_factory=fcos_box_coder)
    center_sampling_radius: float = 1.5  # in anchor sizes (8 x the level's stride)
    focal_alpha: float = 0.25  # sigmoid_focal_loss's defaults, as FCOSHead calls it
    focal_gamma: float = 2.0


def size_ranges(anchors: Tensor, anchors_per_level: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Each location's range of (largest side distance), pixels: anchor size x [4, 8], the
    first level from 0, the last to inf. anchors [A, 4] -> (lower [A], upper [A])."""
    sizes = anchors[:, 2] - anchors[:, 0]
    first = torch.arange(anchors.shape[0], device=anchors.device) < anchors_per_level[0]
    last = torch.arange(anchors.shape[0], device=anchors.device) >= (
        anchors.shape[0] - anchors_per_level[-1]
    )
    lower = torch.where(first, 0.0, sizes * 4)
    upper = torch.where(last, float("inf"), sizes * 8)
    return lower, upper


def match_locations(
    anchors: Tensor,
    anchors_per_level: Sequence[int],
    boxes: Tensor,
    valid: Tensor,
    center_sampling_radius: float = 1.5,
) -> Tensor:
    """torchvision's FCOS matching on padded ground truth, in fixed shapes.

    Args:
        anchors: [A, 4] xyxy, canvas pixels (one per location, level by level).
        anchors_per_level: [A_l, ...] summing to A.
        boxes: [B, M, 4] xyxy, canvas pixels, padding rows cleaned (`clean_padding`).
        valid: [B, M] bool.
    Returns:
        matched: [B, A] int64, index into M of each location's box, or -1 (background).
    """
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    sizes = anchors[:, 2] - anchors[:, 0]  # [A]
    box_centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, M, 2]
    # [B, A, M] throughout, torchvision's [A, M] per image
    offset = (centres[None, :, None, :] - box_centres[:, None, :, :]).abs().amax(dim=3)
    match = offset < center_sampling_radius * sizes[None, :, None]
    x, y = centres[None, :, None, 0], centres[None, :, None, 1]
    x0, y0, x1, y1 = (boxes[:, None, :, i] for i in range(4))
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
    inner = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom))
    outer = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    lower, upper = size_ranges(anchors, anchors_per_level)
    match &= (inner > 0) & (outer > lower[None, :, None]) & (outer < upper[None, :, None])
    match &= valid[:, None, :]
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [B, M]
    # torchvision's expression, dtype promotion included (float32 match x the boxes' dtype)
    score = match.to(torch.float32) * (_AREA_CEILING - areas[:, None, :])
    best, index = score.max(dim=2)  # first index on ties, as torch.max
    return torch.where(best < _UNMATCHED_BELOW, -1, index)


def centerness_targets(box_coder: BoxLinearCoder, anchors: Tensor, boxes: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b)) of each location's box, as
    `FCOSHead.compute_loss`. anchors, boxes [B, A, 4] xyxy px -> [B, A]."""
    distances = box_coder.encode(anchors, boxes)
    left, top, right, bottom = distances.unbind(dim=-1)
    horizontal = torch.minimum(left, right) / torch.maximum(left, right)
    vertical = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return torch.sqrt(horizontal * vertical)


def fcos_loss_sums(
    head: Sequence[Tensor],
    anchors: Tensor,
    anchors_per_level: Sequence[int],
    boxes: Tensor,
    labels: Tensor,
    valid: Tensor,
    options: FCOSLossOptions = FCOSLossOptions(),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The un-normalised loss: (focal sum, GIoU sum, centerness BCE sum, foreground count),
    scalars over the batch. head: (cls_logits, bbox_regression, bbox_ctrness); they and the
    other tensors are `fixed_fcos_loss`'s. Split out so that data-parallel training can
    divide by the foreground count of the *global* batch."""
    cls_logits, bbox_regression, bbox_ctrness = head
    boxes, labels = clean_padding(boxes, labels, valid)
    matched = match_locations(
        anchors, anchors_per_level, boxes, valid, options.center_sampling_radius
    )
    # background locations get their own anchor as the box: finite targets before the mask
    target_of = gather_matched(anchors, boxes, labels, matched)
    foreground = target_of.foreground

    classes = torch.arange(cls_logits.shape[-1], device=cls_logits.device)
    one_hot = (target_of.labels[:, :, None] == classes) & foreground[:, :, None]
    cls_sum = sigmoid_focal_loss(
        cls_logits, one_hot.to(cls_logits.dtype), options.focal_alpha, options.focal_gamma,
        reduction="sum",
    )  # fmt: skip

    # GIoU of the decoded boxes; background locations compare their anchor with itself, so
    # no degenerate box reaches the division (a masked NaN would still poison the gradient)
    decoded = options.box_coder.decode(bbox_regression, target_of.anchors)
    predicted = torch.where(foreground[:, :, None], decoded, target_of.boxes)
    giou = iou_loss("giou", predicted.reshape(-1, 4), target_of.boxes.reshape(-1, 4))
    bbox_sum = torch.where(foreground, giou.view_as(foreground), 0.0).sum()

    centerness = centerness_targets(options.box_coder, target_of.anchors, target_of.boxes)
    bce = F.binary_cross_entropy_with_logits(
        bbox_ctrness.squeeze(dim=2), centerness, reduction="none"
    )
    ctrness_sum = torch.where(foreground, bce, 0.0).sum()
    return cls_sum, bbox_sum, ctrness_sum, foreground.sum()


def fcos_normalise(
    cls_sum: Tensor, bbox_sum: Tensor, ctrness_sum: Tensor, num_foreground: Tensor
) -> dict[str, Tensor]:
    """Each sum divided by max(1, foreground locations): pass the *global* count under DDP."""
    normaliser = num_foreground.clamp(min=1).to(cls_sum.dtype)
    return {
        "classification": cls_sum / normaliser,
        "bbox_regression": bbox_sum / normaliser,
        "bbox_ctrness": ctrness_sum / normaliser,
    }


def fixed_fcos_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    bbox_ctrness: Tensor,
    anchors: Tensor,
    anchors_per_level: Sequence[int],
    boxes: Tensor,
    labels: Tensor,
    valid: Tensor,
    *,
    center_sampling_radius: float = 1.5,
) -> dict[str, Tensor]:
    """FCOS loss (sigmoid focal + GIoU + centerness BCE) in shapes fixed by B, A, C, M.

    Args:
        cls_logits: [B, A, C] raw logits (no background column).
        bbox_regression: [B, A, 4] distances to the sides over the anchor size (the head's
            ReLU output).
        bbox_ctrness: [B, A, 1] centerness logits.
        anchors: [A, 4] xyxy, canvas pixels; anchors_per_level: [A_l, ...] summing to A.
        boxes: [B, M, 4] xyxy, canvas pixels; padding rows may hold anything (even NaN/inf).
        labels: [B, M] int64, column of `cls_logits` for real boxes (0..C-1).
        valid: [B, M] bool, False for padding rows.
        center_sampling_radius: in anchor sizes (torchvision's 1.5).
    Returns:
        {"classification", "bbox_regression", "bbox_ctrness"}: scalars, each divided by
        max(1, foreground locations in the batch), as torchvision's `FCOS.compute_loss`.
    """
    options = FCOSLossOptions(center_sampling_radius=center_sampling_radius)
    head = (cls_logits, bbox_regression, bbox_ctrness)
    sums = fcos_loss_sums(head, anchors, anchors_per_level, boxes, labels, valid, options)
    return fcos_normalise(*sums)
