"""What the fixed-shape losses share: padding cleanup, the padded IoU matrix, the gather of
each anchor's matched box and label, and torchvision's IoU box losses without a boolean mask.

Every function keeps the full `[B, M, ...]` / `[B, A, ...]` shape: padding rows are masked,
never removed, so the shapes depend only on B (images), M (box rows) and A (anchors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# torchvision.ops' IoU losses' default eps (RetinaNet v2 and FCOS call them without one).
IOU_LOSS_EPS = 1e-7
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


def iou_loss(loss_type: str, boxes1: Tensor, boxes2: Tensor, eps: float = IOU_LOSS_EPS) -> Tensor:
    """torchvision.ops' generalized / distance / complete_box_iou_loss, reduction "none".

    The same formulas, op for op, except the intersection: torchvision's `_loss_inter_union`
    writes it through a boolean mask (`intsct[mask] = ...`, a data-dependent shape); here a
    `torch.where`, which gives the same values and gradients.
    boxes1, boxes2: [N, 4] xyxy float (predicted, target). Returns [N].
    """
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsct = torch.where(overlap, (xkis2 - xkis1) * (ykis2 - ykis1), 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsct
    iou = intsct / (union + eps)
    # Smallest enclosing box.
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    if loss_type == "giou":
        area_c = (xc2 - xc1) * (yc2 - yc1)
        return 1 - (iou - ((area_c - union) / (area_c + eps)))
    diagonal_distance_squared = ((xc2 - xc1) ** 2) + ((yc2 - yc1) ** 2) + eps
    x_p, y_p = (x2 + x1) / 2, (y2 + y1) / 2
    x_g, y_g = (x1g + x2g) / 2, (y1g + y2g) / 2
    centers_distance_squared = ((x_p - x_g) ** 2) + ((y_p - y_g) ** 2)
    diou = 1 - iou + (centers_distance_squared / diagonal_distance_squared)
    if loss_type == "diou":
        return diou
    # ciou (torchvision computes its diou part with the default eps 1e-7, whatever eps is).
    w_pred, h_pred, w_gt, h_gt = x2 - x1, y2 - y1, x2g - x1g, y2g - y1g
    v = (4 / (torch.pi**2)) * torch.pow((torch.atan(w_gt / h_gt) - torch.atan(w_pred / h_pred)), 2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou + alpha * v
