"""What the SSD and RetinaNet fixed-shape losses share: padding cleanup, the padded IoU matrix,
and the gather of each anchor's matched box and label.

Every function keeps the full `[B, M, ...]` / `[B, A, ...]` shape: padding rows are masked,
never removed, so the shapes depend only on B (images), M (box rows) and A (anchors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

# Below any real IoU (>= 0): padding rows never win a max and never pass a threshold.
PADDING_IOU = -1.0


def clean_padding(boxes: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the padding rows, before they reach any arithmetic: a NaN or inf there could
    otherwise leak into a max, a sum or a gradient.

    boxes [B, M, 4] xyxy canvas px, labels [B, M] int64, valid [B, M] bool -> the same two,
    with boxes 0 and label 0 on every row where `valid` is False.
    """
    boxes = torch.where(valid[:, :, None], boxes, boxes.new_zeros(()))
    return boxes, torch.where(valid, labels, 0)


def padded_iou(anchors: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
    """IoU of every box row with every anchor, PADDING_IOU on padding rows.

    Args:
        anchors: [A, 4] xyxy, canvas pixels.
        boxes: [B, M, 4] xyxy, canvas pixels; rows where `valid` is False may hold anything.
        valid: [B, M] bool.
    Returns:
        iou [B, M, A].
    """
    batch, max_boxes = valid.shape
    boxes = torch.where(valid[:, :, None], boxes, boxes.new_zeros(()))
    # box_iou is [M, A] per image; flattening the batch keeps one call and one shape.
    iou = box_iou(boxes.reshape(-1, 4), anchors).reshape(batch, max_boxes, anchors.shape[0])
    return torch.where(valid[:, :, None], iou, PADDING_IOU)


class Matched(NamedTuple):
    """Each anchor's target, gathered in fixed shapes (no boolean indexing)."""

    foreground: Tensor  # [B, A] bool: the anchor has a box
    boxes: Tensor  # [B, A, 4] xyxy px: its box; background anchors get the anchor itself
    labels: Tensor  # [B, A] int64: its box's label; 0 on background
    anchors: Tensor  # [B, A, 4] xyxy px: the anchors, expanded over the batch (a view)


def gather_matched(anchors: Tensor, boxes: Tensor, labels: Tensor, matched: Tensor) -> Matched:
    """The matched box and label of every anchor.

    Args:
        anchors: [A, 4] xyxy, canvas pixels.
        boxes: [B, M, 4] xyxy, canvas pixels, labels [B, M]: padding rows already cleaned
            (`clean_padding`): a gathered row must be finite even where it is masked.
        matched: [B, A] int64 index into M, or negative (background or ignored).
    Returns:
        `Matched`. A background anchor gets the anchor itself as its box: a zero regression
        target and a non-degenerate IoU, so nothing non-finite appears before the mask.
    """
    foreground = matched >= 0
    gather_index = matched.clamp(min=0)
    matched_boxes = torch.gather(boxes, 1, gather_index[:, :, None].expand(-1, -1, 4))
    anchors_b = anchors.expand_as(matched_boxes)
    matched_boxes = torch.where(foreground[:, :, None], matched_boxes, anchors_b)
    matched_labels = torch.where(foreground, torch.gather(labels, 1, gather_index), 0)
    return Matched(foreground, matched_boxes, matched_labels, anchors_b)
