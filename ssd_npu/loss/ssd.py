"""The SSD loss with no data-dependent shape.

torchvision's `SSD.compute_loss` gathers the foreground anchors with `torch.where` and
boolean indexing, and its matcher builds an IoU matrix with one row per ground-truth box:
every step has new shapes. Here the ground truth is padded to `M` rows with a `valid` mask
and every operation keeps its full `[B, A, ...]` shape; masks and sums select what
torchvision's indexing selects, so the values and gradients are the same (to float32
rounding: only the order of the summation differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from ssd_npu.loss.common import clean_padding, gather_matched, padded_iou


def ssd_box_coder() -> BoxCoder:
    """torchvision's SSD box coding: weights (10, 10, 5, 5) for (x, y, w, h)."""
    return BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


@dataclass(frozen=True)
class SSDLossOptions:
    """How `ssd_loss_sums` computes torchvision's `SSD.compute_loss`; the defaults are its own."""

    box_coder: BoxCoder = field(default_factory=ssd_box_coder)  # weights (10, 10, 5, 5)
    iou_threshold: float = 0.5  # SSDMatcher's foreground IoU
    neg_to_pos_ratio: int = 3  # hard negatives kept per positive, per image


def match_anchors(
    anchors: Tensor, boxes: Tensor, valid: Tensor, iou_threshold: float = 0.5
) -> Tensor:
    """torchvision's `SSDMatcher` on padded ground truth, in fixed shapes.

    Args:
        anchors: [A, 4] xyxy, canvas pixels.
        boxes: [B, M, 4] xyxy, canvas pixels; rows where `valid` is False are ignored (they
            may hold anything, even NaN).
        valid: [B, M] bool.
    Returns:
        matched: [B, A] int64, index into M of the box matched to each anchor, or -1
        (background). Anchors between thresholds do not exist here: SSDMatcher uses one.
    """
    max_boxes = valid.shape[1]
    iou = padded_iou(anchors, boxes, valid)  # [B, M, A]

    # Matcher: best box per anchor (first index on ties, as torch.max), below threshold -> -1.
    best_iou, matched = iou.max(dim=1)
    matched = torch.where(best_iou < iou_threshold, -1, matched)

    # SSDMatcher: each box is forced onto its best anchor. torchvision writes
    # `matches[best_anchor] = arange(M)`; when two boxes share a best anchor the later box
    # wins (CPU index_put order), so take the largest box index that chose each anchor: a
    # scatter of the box indices onto their best anchors, reduced by max (padding rows
    # scatter -1, which changes nothing).
    best_anchor = iou.argmax(dim=2)  # [B, M]
    box_index = torch.arange(max_boxes, device=anchors.device).expand_as(best_anchor)
    box_index = torch.where(valid, box_index, -1)
    forced = torch.full_like(matched, -1).scatter_reduce(1, best_anchor, box_index, "amax")
    return torch.where(forced >= 0, forced, matched)


def fixed_ssd_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    boxes: Tensor,
    labels: Tensor,
    valid: Tensor,
    *,
    box_coder: BoxCoder | None = None,
    iou_threshold: float = 0.5,
    neg_to_pos_ratio: int = 3,
) -> dict[str, Tensor]:
    """SSD loss (Smooth-L1 + softmax CE with 3:1 hard negatives) in shapes fixed by B, A, C, M.

    Args:
        cls_logits: [B, A, C] raw logits.
        bbox_regression: [B, A, 4] encoded deltas.
        anchors: [A, 4] xyxy, canvas pixels.
        boxes: [B, M, 4] xyxy, canvas pixels; padding rows may hold anything (even NaN).
        labels: [B, M] int64, 1..C-1 for real boxes.
        valid: [B, M] bool, False for padding rows.
        box_coder: how boxes are encoded; None: torchvision's SSD BoxCoder, weights (10, 10, 5, 5).
        iou_threshold: SSDMatcher's foreground IoU; neg_to_pos_ratio: hard negatives per positive.
    Returns:
        {"bbox_regression": scalar, "classification": scalar}, each divided by
        max(1, foreground anchors in the batch), as torchvision's `SSD.compute_loss`.
    """
    options = SSDLossOptions(
        ssd_box_coder() if box_coder is None else box_coder, iou_threshold, neg_to_pos_ratio
    )
    bbox_sum, cls_sum, num_foreground = ssd_loss_sums(
        cls_logits, bbox_regression, anchors, boxes, labels, valid, options
    )
    return normalise(bbox_sum, cls_sum, num_foreground)


def normalise(bbox_sum: Tensor, cls_sum: Tensor, num_foreground: Tensor) -> dict[str, Tensor]:
    """Both sums divided by max(1, foreground anchors): pass the *global* count under DDP."""
    normaliser = num_foreground.clamp(min=1).to(bbox_sum.dtype)
    return {"bbox_regression": bbox_sum / normaliser, "classification": cls_sum / normaliser}


def ssd_loss_sums(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    boxes: Tensor,
    labels: Tensor,
    valid: Tensor,
    options: SSDLossOptions = SSDLossOptions(),
) -> tuple[Tensor, Tensor, Tensor]:
    """The un-normalised loss: (bbox Smooth-L1 sum, classification CE sum, foreground count).

    The tensors are `fixed_ssd_loss`'s; `options` its keywords. Split out so that
    data-parallel training can divide by the foreground count of the *global* batch, as one
    process would.
    """
    boxes, labels = clean_padding(boxes, labels, valid)
    matched = match_anchors(anchors, boxes, valid, options.iou_threshold)  # [B, A]
    target_of = gather_matched(anchors, boxes, labels, matched)
    foreground = target_of.foreground
    num_foreground = foreground.sum()

    # Regression: encode every anchor against its matched box (background anchors: a zero
    # target), then mask the background out.
    target = options.box_coder.encode_single(
        target_of.boxes.reshape(-1, 4), target_of.anchors.reshape(-1, 4)
    ).reshape_as(bbox_regression)
    smooth_l1 = F.smooth_l1_loss(bbox_regression, target, reduction="none")
    bbox_loss = torch.where(foreground, smooth_l1.sum(dim=2), 0.0).sum()

    # Classification: cross entropy on every anchor, then hard negative mining exactly as
    # torchvision does it (sort, rank, keep the top 3 x positives per image).
    cls_targets = target_of.labels  # 0 (background) where no box matched
    num_classes = cls_logits.shape[-1]
    cls_loss = F.cross_entropy(
        cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1), reduction="none"
    ).reshape(cls_targets.shape)
    positive = cls_targets > 0
    num_negative = options.neg_to_pos_ratio * positive.sum(1, keepdim=True)
    # torchvision sorts the negatives' losses, then sorts the order again for each anchor's
    # rank. The rank is the order's inverse permutation: one scatter instead of a second
    # sort. Mining picks anchors, it needs no gradient: the loss is sorted detached.
    negative_loss = torch.where(positive, -float("inf"), cls_loss.detach())
    order = negative_loss.sort(1, descending=True)[1]  # [B, A] anchor at each rank
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # [B, A] rank of each anchor
    negative = rank < num_negative
    # Summed separately, as torchvision does: when 4 x positives exceeds A an anchor can be
    # in both sets and then counts twice there too.
    cls_sum = (
        torch.where(positive, cls_loss, 0.0).sum() + torch.where(negative, cls_loss, 0.0).sum()
    )

    return bbox_loss, cls_sum, num_foreground
