"""The RetinaNet loss with no data-dependent shape.

torchvision's `RetinaNet.compute_loss` matches each image with an IoU matrix of one row per
ground-truth box, then selects the foreground and the not-ignored anchors with `torch.where`
and boolean indexing: every step has new shapes. Here the ground truth is padded to `M` rows
with a `valid` mask and every operation keeps its full `[B, A, ...]` shape; masks and sums
select what torchvision's indexing selects, so the values and gradients are the same (to
float32 rounding: only the order of the summation differs).

Normalisation, as torchvision does it (`RetinaNetClassificationHead.compute_loss`,
`RetinaNetRegressionHead.compute_loss`): each image's focal-loss sum and box-loss sum are
divided by max(1, that image's foreground anchors), and the per-image results are averaged
over the images of the batch. Unlike SSD's, this normaliser needs no count from other images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import sigmoid_focal_loss

from ssd_npu.loss.common import clean_padding, gather_matched, iou_loss, padded_iou

# torchvision's `_box_loss` accepts these; RetinaNet uses "l1" (v1, the default) and "giou" (v2).
BOX_LOSS_TYPES = ("l1", "smooth_l1", "ciou", "diou", "giou")
# `_box_loss` defaults when it is called without `cnf`, as RetinaNet calls it.
_SMOOTH_L1_BETA = 1.0
_ABOVE_ANY_IOU = 2.0  # IoU is at most 1


def retinanet_box_coder() -> BoxCoder:
    """torchvision's RetinaNet box coding: weights (1, 1, 1, 1) for (x, y, w, h)."""
    return BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


@dataclass(frozen=True)
class RetinaNetLossOptions:
    """How `retinanet_loss_sums` computes torchvision's `RetinaNet.compute_loss`; the defaults
    are retinanet_resnet50_fpn's (v2 differs only in `bbox_reg_loss_type="giou"`)."""

    box_coder: BoxCoder = field(default_factory=retinanet_box_coder)  # weights (1, 1, 1, 1)
    bbox_reg_loss_type: str = "l1"  # one of BOX_LOSS_TYPES
    fg_iou_thresh: float = 0.5  # the Matcher's: foreground at or above
    bg_iou_thresh: float = 0.4  # background below; in between ignored by the loss
    allow_low_quality_matches: bool = True  # each box keeps its best anchors
    focal_alpha: float = 0.25  # sigmoid_focal_loss's (torchvision calls it with defaults)
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        # fail when the options are built (at model set-up), not at the first loss
        if self.bbox_reg_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(
                f"bbox_reg_loss_type {self.bbox_reg_loss_type!r}: use one of {BOX_LOSS_TYPES}"
            )


def match_anchors_retinanet(
    anchors: Tensor,
    boxes: Tensor,
    valid: Tensor,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    allow_low_quality_matches: bool = True,
) -> Tensor:
    """torchvision's `Matcher(fg, bg, allow_low_quality_matches)` on padded ground truth.

    Args:
        anchors: [A, 4] xyxy, canvas pixels.
        boxes: [B, M, 4] xyxy, canvas pixels (M >= 1); rows where `valid` is False may hold
            anything (even NaN/inf).
        valid: [B, M] bool.
    Returns:
        matched: [B, A] int64: the index into M of each anchor's box, or -1 (best IoU below
        `bg_iou_thresh`: background) or -2 (best IoU in [bg, fg): ignored by the loss). An
        image with no valid box is all -1, as `RetinaNet.compute_loss` makes it.
    """
    iou = padded_iou(anchors, boxes, valid)  # [B, M, A]

    # Best box per anchor (first index on ties, as torch.max), then the two thresholds.
    best_iou, all_matches = iou.max(dim=1)  # [B, A]
    matched = torch.where(best_iou < bg_iou_thresh, Matcher.BELOW_LOW_THRESHOLD, all_matches)
    between = (best_iou >= bg_iou_thresh) & (best_iou < fg_iou_thresh)
    matched = torch.where(between, Matcher.BETWEEN_THRESHOLDS, matched)
    if allow_low_quality_matches:
        # set_low_quality_matches_: every anchor that ties for some box's best IoU (even a
        # low one) gets back its *own* best box (`all_matches`), not necessarily that box.
        # Padding rows' "best" is set above any IoU, so no anchor equals it: one [B, M, A]
        # comparison instead of a comparison and a mask.
        best_per_box = iou.amax(dim=2, keepdim=True)  # [B, M, 1]
        best_per_box = best_per_box.masked_fill(~valid[:, :, None], _ABOVE_ANY_IOU)
        is_best = (iou == best_per_box).any(dim=1)  # [B, A]
        matched = torch.where(is_best, all_matches, matched)
    return matched


def fixed_retinanet_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    boxes: Tensor,
    labels: Tensor,
    valid: Tensor,
    *,
    box_coder: BoxCoder | None = None,
    bbox_reg_loss_type: str = "l1",
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    allow_low_quality_matches: bool = True,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """RetinaNet loss (sigmoid focal + box loss) in shapes fixed by B, A, C, M.

    Args:
        cls_logits: [B, A, C] raw logits.
        bbox_regression: [B, A, 4] encoded deltas.
        anchors: [A, 4] xyxy, canvas pixels.
        boxes: [B, M, 4] xyxy, canvas pixels; padding rows may hold anything (even NaN/inf).
        labels: [B, M] int64, column of `cls_logits` for real boxes (0..C-1).
        valid: [B, M] bool, False for padding rows.
        box_coder: None: torchvision's RetinaNet BoxCoder, weights (1, 1, 1, 1).
        bbox_reg_loss_type: one of BOX_LOSS_TYPES; "l1" is torchvision's RetinaNet (v1)
            default, retinanet_resnet50_fpn_v2 sets "giou".
        fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches: the Matcher's.
        focal_alpha, focal_gamma: `sigmoid_focal_loss`'s (torchvision calls it with defaults).
    Returns:
        {"classification": scalar, "bbox_regression": scalar}: per image, each sum divided by
        max(1, that image's foreground anchors); then the mean over the B images, as
        torchvision's `RetinaNet.compute_loss`.
    """
    options = RetinaNetLossOptions(
        retinanet_box_coder() if box_coder is None else box_coder,
        bbox_reg_loss_type, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches,
        focal_alpha, focal_gamma,
    )  # fmt: skip
    bbox_sums, cls_sums, num_foreground = retinanet_loss_sums(
        cls_logits, bbox_regression, anchors, boxes, labels, valid, options
    )
    return retinanet_normalise(bbox_sums, cls_sums, num_foreground)


def retinanet_normalise(
    bbox_sums: Tensor,
    cls_sums: Tensor,
    num_foreground: Tensor,
    num_images: int | None = None,
) -> dict[str, Tensor]:
    """Per image: sum / max(1, foreground anchors); then summed and divided by `num_images`.

    Args:
        bbox_sums, cls_sums, num_foreground: [B] each, from `retinanet_loss_sums`.
        num_images: what the per-image losses are averaged over; None: B, which is
            torchvision's loss. Under DDP pass the *global* batch (B x world size): each
            rank's loss is then its share of torchvision's loss on the global batch (the
            shares sum to it, and world size x each share, gradient-averaged by DDP, gives its
            gradient), the convention `fixed_ssd_loss`'s global-count `normalise` follows.
            The per-image foreground counts stay local: torchvision's normaliser is per image.
    """
    normaliser = num_foreground.clamp(min=1).to(cls_sums.dtype)
    count = bbox_sums.shape[0] if num_images is None else num_images
    return {
        "classification": (cls_sums / normaliser).sum() / count,
        "bbox_regression": (bbox_sums / normaliser).sum() / count,
    }


def retinanet_loss_sums(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    boxes: Tensor,
    labels: Tensor,
    valid: Tensor,
    options: RetinaNetLossOptions = RetinaNetLossOptions(),
) -> tuple[Tensor, Tensor, Tensor]:
    """The un-normalised loss per image: (box-loss sums [B], focal-loss sums [B], foreground
    anchors [B] int64).

    The tensors are `fixed_retinanet_loss`'s; `options` its keywords. Split out so that
    data-parallel training can choose what the per-image losses are averaged over (see
    `retinanet_normalise`).
    """
    boxes, labels = clean_padding(boxes, labels, valid)
    thresholds = (options.fg_iou_thresh, options.bg_iou_thresh)
    matched = match_anchors_retinanet(
        anchors, boxes, valid, *thresholds, options.allow_low_quality_matches
    )  # [B, A]
    target_of = gather_matched(anchors, boxes, labels, matched)
    foreground, batch = target_of.foreground, matched.shape[0]
    num_foreground = foreground.sum(dim=1)

    # Classification: one-hot target of the matched box's label on foreground anchors, zeros
    # on background; anchors between the thresholds (-2) are left out of the sum.
    # The one-hot written by one scatter into zeros, as torchvision's index_put does it (a 1 on
    # foreground, a 0 written over the 0 on background): [B, A, C] once, no compare-and-mask.
    on_label = foreground[:, :, None].to(cls_logits.dtype)
    one_hot = torch.zeros_like(cls_logits).scatter_(2, target_of.labels[:, :, None], on_label)
    alpha, gamma = options.focal_alpha, options.focal_gamma
    focal = sigmoid_focal_loss(cls_logits, one_hot, alpha, gamma, reduction="none")  # [B, A, C]
    # Per anchor first, then the mask on [B, A]: an ignored anchor's row drops out whole.
    counted = matched != Matcher.BETWEEN_THRESHOLDS
    cls_sums = torch.where(counted, focal.sum(dim=2), 0.0).sum(dim=1)

    # Regression over every anchor (background: the anchor itself as its box, a finite
    # target and a non-degenerate IoU), masked out of the sum on background.
    flat = (
        target_of.anchors.reshape(-1, 4),
        target_of.boxes.reshape(-1, 4),
        bbox_regression.reshape(-1, 4),
    )
    per_anchor = _box_loss_per_anchor(options.bbox_reg_loss_type, options.box_coder, *flat)
    bbox_sums = torch.where(foreground, per_anchor.reshape(batch, -1), 0.0).sum(dim=1)
    return bbox_sums, cls_sums, num_foreground


def _box_loss_per_anchor(
    loss_type: str, box_coder: BoxCoder, anchors: Tensor, matched_boxes: Tensor, deltas: Tensor
) -> Tensor:
    """torchvision's `_box_loss` with reduction "none": [N] loss per anchor, N = B x A.

    anchors, matched_boxes: [N, 4] xyxy, canvas pixels; deltas: [N, 4] encoded regression.
    """
    if loss_type in ("l1", "smooth_l1"):
        target = box_coder.encode_single(matched_boxes, anchors)
        if loss_type == "l1":
            loss = F.l1_loss(deltas, target, reduction="none")
        else:
            loss = F.smooth_l1_loss(deltas, target, reduction="none", beta=_SMOOTH_L1_BETA)
        return loss.sum(dim=-1)
    return iou_loss(loss_type, box_coder.decode_single(deltas, anchors), matched_boxes)
