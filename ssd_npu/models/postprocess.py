"""Each detector's own postprocess with every shape static: head outputs -> [B, D] detections.

torchvision's `postprocess_detections` keeps a data-dependent number of boxes per image (score
threshold, top-k of what passed, NMS), so it runs on the host. These functions give the same
detections as fixed-size tensors plus a validity mask, D = detections_per_img, with no
`nonzero`, boolean indexing, `.item()` or branch on data: a shape-compiling device compiles
them once. Every input is one canvas for the whole batch (the same anchors for every image).

The recipes, mirrored from torchvision 0.29 (`SSD.postprocess_detections`,
`RetinaNet.postprocess_detections`):
- SSD / SSDLite: softmax over the C columns (background = column 0); decode every anchor's box
  with the detector's box_coder, clip to the canvas; for each class 1..C-1 separately, the
  scores > score_thresh (strict), then the top min(A, topk_candidates) of those; batched NMS
  (nms_thresh) over all classes' candidates; the first detections_per_img by score. Labels are
  the column index, 1..C-1.
- RetinaNet: for each FPN level separately, sigmoid of the [A_l, C] logits flattened to
  A_l * C (anchor, class) pairs; the pairs > score_thresh, then the top min(A_l * C,
  topk_candidates) of those (so topk_candidates is per level, over all classes together: up
  to 5 x 1000 candidates); anchor = pair // C, label = pair % C (no background column: labels
  0..C-1); decode and clip those; batched NMS over all levels; the first detections_per_img.
Static form: the "> score_thresh" filter becomes a mask (scores at or below it sort last as
-inf in `topk` of the fixed size min(A, k), and are marked invalid), so the valid candidates
are exactly torchvision's, in the same order, for distinct scores.

Equal to torchvision (tested): the same boxes, scores and labels, for distinct scores. Where
scores tie at the top-k cut or in NMS order, either side may pick the other tied candidate.
Elementwise exp/softmax/sigmoid are the same ATen ops on other tensor layouts, so a value can
differ in its last bit (ATen computes tail elements with its scalar function) and a decision
at an IoU or score exactly at a threshold could then differ.

Cost: SSD: NMS per class on [B, C-1, k, k] (k = min(A, topk_candidates); ssdlite: 90 classes
x 300 x 300 bools = 8.1 MB per image) and k sequential NMS steps; RetinaNet: `fixed_batched_nms`
over N = sum over levels of min(A_l * C, topk_candidates) candidates (B x N x N bools, N
sequential steps; N = 5000 for COCO at 512 px: 25 MB per image, 5000 steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from ssd_npu.models.nms import (
    compute_dtype,
    fixed_batched_nms,
    greedy_keep,
    suppression_matrix,
    torchvision_coordinates,
)

if TYPE_CHECKING:  # the families (imported by model.py) import this module
    from ssd_npu.models.detector import FixedDetector


class Detections(NamedTuple):
    """Fixed-size detections of a batch; D = detections_per_img, in descending score.

    boxes [B, D, 4] xyxy canvas pixels; scores [B, D]; labels [B, D] int64 (the detector's
    label space); valid [B, D] bool, a prefix of True (invalid slots hold zeros).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor


class Recipe(NamedTuple):
    """A detector's postprocess settings (its attributes of the same names)."""

    score_thresh: float
    nms_thresh: float
    topk_candidates: int
    detections_per_img: int


def recipe_of(detector: torch.nn.Module) -> Recipe:
    """The postprocess settings a torchvision SSD or RetinaNet carries."""
    return Recipe(
        float(detector.score_thresh),
        float(detector.nms_thresh),
        int(detector.topk_candidates),
        int(detector.detections_per_img),
    )


def fixed_postprocess(model: FixedDetector, *head: Tensor) -> Detections:
    """The detector's own postprocess of FixedDetector head outputs, every shape static: its
    family's (`ssd_npu.families`).

    head: the outputs FixedDetector returns, e.g. cls_logits [B, A, C], bbox_regression
    [B, A, 4] (computed in float32, or float64 if given) -> Detections with D = the
    detector's detections_per_img, boxes in canvas pixels.
    """
    return model.family.device_postprocess(model, head)


def ssd_postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    canvas: tuple[int, int],
    box_coder: BoxCoder,
    recipe: Recipe,
) -> Detections:
    """`SSD.postprocess_detections` (SSD300, SSDLite) with static shapes.

    cls_logits [B, A, C] (column 0 background); bbox_regression [B, A, 4] encoded deltas;
    anchors [A, 4] xyxy canvas pixels; canvas (H, W) pixels -> Detections, labels 1..C-1.
    """
    dtype = compute_dtype(cls_logits.dtype)
    scores = torch.softmax(cls_logits.to(dtype), dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, A]
    boxes = decode_boxes(bbox_regression.to(dtype), anchors, canvas, box_coder)  # [B, A, 4]
    batch, classes, num_anchors = scores.shape
    above = scores > recipe.score_thresh
    k = min(num_anchors, recipe.topk_candidates)
    top, anchor = scores.masked_fill(~above, float("-inf")).topk(k, dim=-1)  # [B, C-1, k]
    valid = above.gather(-1, anchor)
    per_class = boxes[:, None].expand(batch, classes, num_anchors, 4)
    cand = per_class.gather(2, anchor[..., None].expand(-1, -1, -1, 4))  # [B, C-1, k, 4]
    labels = torch.arange(1, classes + 1, device=scores.device)[None, :, None].expand_as(anchor)
    # the IoUs batched_nms would compute over the image's candidates of all classes together
    coords = torchvision_coordinates(cand.flatten(1, 2), labels.flatten(1), valid.flatten(1))
    suppress = suppression_matrix(coords.view_as(cand), recipe.nms_thresh)  # per class
    kept = greedy_keep(suppress, valid)  # [B, C-1, k]
    return best_kept(
        cand.flatten(1, 2), top.flatten(1), labels.flatten(1), kept.flatten(1),
        recipe.detections_per_img,
    )  # fmt: skip


def retinanet_postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    anchors_per_level: Sequence[int],
    canvas: tuple[int, int],
    box_coder: BoxCoder,
    recipe: Recipe,
) -> Detections:
    """`RetinaNet.postprocess_detections` with static shapes.

    cls_logits [B, A, C] (no background column); bbox_regression [B, A, 4]; anchors [A, 4]
    xyxy canvas pixels; anchors_per_level [A_l, ...] summing to A (FPN levels, as
    `RetinaNet.forward` splits them); canvas (H, W) -> Detections, labels 0..C-1.
    """
    dtype = compute_dtype(cls_logits.dtype)
    levels = zip(
        cls_logits.to(dtype).split(list(anchors_per_level), dim=1),
        bbox_regression.to(dtype).split(list(anchors_per_level), dim=1),
        anchors.split(list(anchors_per_level), dim=0),
        strict=True,
    )
    parts = [level_candidates(*level, canvas, box_coder, recipe) for level in levels]
    boxes, scores, labels, valid = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
    keep, keep_valid = fixed_batched_nms(
        boxes, scores, labels, recipe.nms_thresh, recipe.detections_per_img, valid
    )
    return Detections(
        zero_invalid(boxes.gather(1, keep[..., None].expand(-1, -1, 4)), keep_valid),
        zero_invalid(scores.gather(1, keep), keep_valid),
        zero_invalid(labels.gather(1, keep), keep_valid),
        keep_valid,
    )


def level_candidates(
    logits: Tensor,
    regression: Tensor,
    anchors: Tensor,
    canvas: tuple[int, int],
    box_coder: BoxCoder,
    recipe: Recipe,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One RetinaNet level: logits [B, A_l, C], regression [B, A_l, 4], anchors [A_l, 4] ->
    the top min(A_l * C, topk_candidates) (anchor, class) pairs above score_thresh: boxes
    [B, k, 4] decoded and clipped, scores [B, k] descending, labels [B, k], valid [B, k]."""
    scores = torch.sigmoid(logits).flatten(1)  # [B, A_l * C], anchor-major as torchvision
    top, anchor, labels, valid = top_pairs(scores, logits.shape[-1], recipe)
    deltas = regression.gather(1, anchor[..., None].expand(-1, -1, 4))
    rel_codes = deltas.reshape(-1, 4)
    boxes = box_coder.decode_single(rel_codes, anchors.to(logits.dtype)[anchor.reshape(-1)])
    boxes = clip_to_canvas(boxes.view(deltas.shape), canvas)
    return boxes, top, labels, valid


def top_pairs(
    scores: Tensor, classes: int, recipe: Recipe
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level's candidates as RetinaNet and FCOS pick them: scores [B, A_l * C] of the
    anchor-major (anchor, class) pairs -> the top k = min(A_l * C, topk_candidates) pairs
    above score_thresh: scores [B, k] descending, their anchor [B, k] and label [B, k], and
    valid [B, k] (pairs at or below the threshold sort last as -inf and are marked invalid)."""
    above = scores > recipe.score_thresh
    k = min(scores.shape[1], recipe.topk_candidates)
    top, pair = scores.masked_fill(~above, float("-inf")).topk(k, dim=-1)
    anchor = torch.div(pair, classes, rounding_mode="floor")
    return top, anchor, pair % classes, above.gather(1, pair)


def decode_boxes(
    bbox_regression: Tensor, anchors: Tensor, canvas: tuple[int, int], box_coder: BoxCoder
) -> Tensor:
    """bbox_regression [B, A, 4] deltas, anchors [A, 4] -> [B, A, 4] xyxy boxes clipped to the
    canvas: the box_coder's `decode_single` on every (image, anchor), as torchvision does."""
    batch, num_anchors, _ = bbox_regression.shape
    anchors = anchors.to(bbox_regression.dtype).expand(batch, num_anchors, 4)
    boxes = box_coder.decode_single(bbox_regression.reshape(-1, 4), anchors.reshape(-1, 4))
    return clip_to_canvas(boxes.view(batch, num_anchors, 4), canvas)


def clip_to_canvas(boxes: Tensor, canvas: tuple[int, int]) -> Tensor:
    """boxes [..., 4] xyxy -> x in [0, W], y in [0, H] (`clip_boxes_to_image`'s clamps)."""
    height, width = canvas
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), -1
    )


def best_kept(boxes: Tensor, scores: Tensor, labels: Tensor, kept: Tensor, d: int) -> Detections:
    """The d highest-scoring kept candidates, descending (batched_nms's order, then [:d]).

    boxes [B, M, 4], scores [B, M], labels [B, M], kept [B, M] bool -> Detections [B, d].
    """
    batch, m = scores.shape
    top = min(d, m)
    _, index = scores.masked_fill(~kept, float("-inf")).topk(top, dim=-1)  # [B, top]
    valid = kept.gather(1, index)
    if top < d:  # fewer candidates than detections: pad (a static shape)
        index = torch.cat([index, index.new_zeros(batch, d - top)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(batch, d - top)], dim=1)
    return Detections(
        zero_invalid(boxes.gather(1, index[..., None].expand(-1, -1, 4)), valid),
        zero_invalid(scores.gather(1, index), valid),
        zero_invalid(labels.gather(1, index), valid),
        valid,
    )


def zero_invalid(values: Tensor, valid: Tensor) -> Tensor:
    """values [B, D] or [B, D, 4] with the slots where valid [B, D] is False set to 0."""
    mask = valid if values.dim() == valid.dim() else valid[..., None]
    return values.masked_fill(~mask, 0)


def as_dicts(detections: Detections) -> list[dict[str, Tensor]]:
    """Host side: per image {"boxes" [n, 4], "scores" [n], "labels" [n]} of the valid slots,
    the format of torchvision's `postprocess_detections` (n varies: not for the device)."""
    return [
        {"boxes": b[v], "scores": s[v], "labels": lab[v]}
        for b, s, lab, v in zip(*detections, strict=True)
    ]
