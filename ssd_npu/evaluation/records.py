"""COCO detection results in bulk: one float64 array per evaluation, no dict per detection.

The array is COCO's own numeric result format (pycocotools' and faster-coco-eval's
`loadNumpyAnnotations`): `results [N, 7]` float64, one row per detection,
`(image_id, x, y, w, h, score, category_id)`, box xywh in original-image pixels. float64
holds image ids exactly (< 2^53) and the float32 boxes and scores of the detector without
rounding. The rows of one image are consecutive, in the detector's order (descending score).

The fixed path's detections arrive as `packed [B, D, 7]` (x1, y1, x2, y2 canvas pixels,
score, label, valid; `ssd_npu.evaluation.evaluate.pack_detections`): `packed_results` maps a whole
evaluation's worth back to the original images (`unfit_boxes`, in bulk) and keeps the valid
rows of real images with tensor ops only. The COCO engines still take a list of dicts
(`ssd_npu.evaluation.cocoeval.as_dicts`); that conversion is part of COCOeval's time, not the
records'.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

COLUMNS = ("image_id", "x", "y", "w", "h", "score", "category_id")


def empty_results() -> np.ndarray:
    """No detections: [0, 7] float64."""
    return np.zeros((0, len(COLUMNS)), dtype=np.float64)


def _xyxy_rows(image_ids: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor) -> np.ndarray:
    """Rows from flat columns: image_ids [N], boxes [N, 4] xyxy original pixels, scores [N],
    labels [N] -> [N, 7] float64. The width and height are taken in float64, as pycocotools'
    own records of float boxes would be."""
    xyxy = boxes.detach().to("cpu", torch.float64)
    columns = [
        image_ids.to("cpu", torch.float64)[:, None],
        xyxy[:, :2],
        xyxy[:, 2:] - xyxy[:, :2],
        scores.detach().to("cpu", torch.float64)[:, None],
        labels.detach().to("cpu", torch.float64)[:, None],
    ]
    return torch.cat(columns, dim=1).numpy()


def image_results(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> np.ndarray:
    """One image's detections: boxes [N, 4] xyxy original pixels, scores [N], labels [N]
    category ids -> [N, 7] float64."""
    ids = torch.full((boxes.shape[0],), int(image_id), dtype=torch.int64)
    return _xyxy_rows(ids, boxes, scores, labels)


def packed_results(
    packed: Tensor, scales: Tensor, orig_sizes: Tensor, image_ids: Tensor
) -> np.ndarray:
    """Every valid detection of `packed` as result rows, boxes mapped back to the originals.

    packed [I, D, 7] float32 (x1, y1, x2, y2 canvas pixels, score, label, valid) on the cpu;
    scales [I, 2] (sx, sy) canvas pixels per original pixel; orig_sizes [I, 2] (h, w)
    original pixels; image_ids [I] int (< 0: a repeat that only filled the last batch,
    skipped). Returns [N, 7] float64: exactly `unfit_boxes` image by image (float32 division,
    then clipped to the image), in one pass over all I images.
    """
    scale = scales.to(torch.float32)[:, [0, 1, 0, 1]][:, None, :]  # [I, 1, 4]
    boxes = packed[..., :4].to(torch.float32) / scale  # [I, D, 4] original pixels
    h = orig_sizes[:, 0].to(torch.float32)[:, None]  # [I, 1]
    w = orig_sizes[:, 1].to(torch.float32)[:, None]
    zero = torch.zeros((), dtype=torch.float32)
    x = boxes[..., 0::2].clamp(zero, w[..., None])  # clamp(0, w) per image, as unfit_boxes
    y = boxes[..., 1::2].clamp(zero, h[..., None])
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
    keep = (packed[..., 6] > 0.5) & (image_ids[:, None] >= 0)  # [I, D]
    ids = image_ids[:, None].expand(keep.shape)
    return _xyxy_rows(ids[keep], boxes[keep], packed[..., 4][keep], packed[..., 5][keep])


def pack_per_image(detections: list[dict[str, Tensor]]) -> Tensor:
    """Per-image detections of varying count N_i ({"boxes" [N_i, 4], "scores", "labels"}, as
    torchvision's postprocess gives them) -> packed [B, max N_i, 7] float32 with a valid
    column, so the host postprocess's records are built in bulk like the device's."""
    width = max((int(d["scores"].shape[0]) for d in detections), default=0)
    packed = torch.zeros((len(detections), width, 7), dtype=torch.float32)
    for i, d in enumerate(detections):  # a loop per image, not per detection
        n = int(d["scores"].shape[0])
        packed[i, :n, :4] = d["boxes"].detach().float().cpu()
        packed[i, :n, 4] = d["scores"].detach().float().cpu()
        packed[i, :n, 5] = d["labels"].detach().float().cpu()
        packed[i, :n, 6] = 1.0
    return packed


def pad_cat(parts: list[Tensor]) -> Tensor:
    """Packed batches [B_i, D_i, 7] -> [sum B_i, max D_i, 7], short ones padded with invalid
    rows (zeros: valid 0)."""
    width = max((int(p.shape[1]) for p in parts), default=0)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts]
    return torch.cat(padded) if padded else torch.zeros((0, 0, 7))
