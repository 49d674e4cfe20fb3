"""What the SSD and RetinaNet fixed-shape losses share: padding cleanup, the padded IoU matrix,
and the gather of each anchor's matched box and label.

Every function keeps the full `[B, M, ...]` / `[B, A, ...]` shape: padding rows are masked,
never removed, so the shapes depend only on B (images), M (box rows) and A (anchors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

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
        iou [B, M, A], equal bit for bit to torchvision's `box_iou` on each valid row.

    torchvision's `box_iou` broadcasts the corners as `[N, A, 2]` pairs (max, min, subtract,
    clamp, then a product of the two columns); here each coordinate is its own `[B, M, 1]`
    against `[A]` broadcast, which does the same float operations on each element without
    the strided pairs (about half the time on a CPU, and less memory traffic anywhere).
    """
    boxes = torch.where(valid[:, :, None], boxes, boxes.new_zeros(()))  # [B, M, 4]: cheap
    bx1, by1, bx2, by2 = (c[:, :, None] for c in boxes.unbind(dim=2))  # [B, M, 1] each
    ax1, ay1, ax2, ay2 = anchors.unbind(dim=1)  # [A] each
    # In place where a [B, M, A] result is fresh: four fewer large buffers (no gradient flows
    # through the matching). The float operations are box_iou's, element for element.
    inter = torch.minimum(bx2, ax2).sub_(torch.maximum(bx1, ax1)).clamp_(min=0)  # width
    inter.mul_(torch.minimum(by2, ay2).sub_(torch.maximum(by1, ay1)).clamp_(min=0))
    union = ((bx2 - bx1) * (by2 - by1) + (ax2 - ax1) * (ay2 - ay1)).sub_(inter)
    iou = inter.div_(union)  # [B, M, A]
    return iou.masked_fill_(~valid[:, :, None], PADDING_IOU)


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
