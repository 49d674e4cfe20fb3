"""Dynamicity report: choose `canvas`, `fit` and `max_boxes` from the annotation file alone.

Reads `instances_<split>.json` with pycocotools and never decodes an image, so it runs in
seconds even on COCO train2017 (118k images, 860k boxes): every statistic is a numpy
expression over flat arrays. Boxes are counted as training targets, with the same rules as
`CocoDetectionDataset.target`: crowd annotations excluded, boxes clipped to the image,
boxes empty after clipping dropped ("degenerate").

Units: image and box sizes in pixels; a box's size is sqrt(w * h); shares in percent.
This module computes the report dict; `ssd_npu.tools.recommend` chooses the overrides from its
statistics and `ssd_npu.tools.report_render` prints and saves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssd_npu.choices import FITS, Canvas
from ssd_npu.data.box_table import BoxTable, box_table, load_coco
from ssd_npu.data.buckets import bucket_of
from ssd_npu.models.specs import DEFAULT_MODEL, model_spec
from ssd_npu.tools.recommend import MAX_BOXES_CANDIDATES, recommend, truncation

PERCENTILES = (50, 90, 99, 99.9)


def percentiles(values: np.ndarray) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max (0 for an empty array)."""
    if values.size == 0:
        return {**{f"p{p:g}": 0.0 for p in PERCENTILES}, "max": 0.0}
    qs = np.percentile(values, PERCENTILES)
    return {
        **{f"p{p:g}": round(float(q), 2) for p, q in zip(PERCENTILES, qs, strict=True)},
        "max": float(values.max()),
    }


def fit_scales(
    heights: np.ndarray, widths: np.ndarray, canvas: tuple[int, int], fit: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image (sx, sy, content_area_px) of `fixed_shape.fit_to_canvas`, vectorised."""
    H, W = canvas
    if fit == "stretch":
        return W / widths, H / heights, np.full_like(heights, H * W)
    s = np.minimum(H / heights, W / widths)
    if fit == "pad":  # no resize when the image fits; larger images are scaled down
        s = np.where((heights <= H) & (widths <= W), 1.0, s)
    ch = np.clip(np.round(heights * s), 1, H)
    cw = np.clip(np.round(widths * s), 1, W)
    return cw / widths, ch / heights, ch * cw


def smallest_anchor(canvas: tuple[int, int], num_classes: int, model: str = DEFAULT_MODEL) -> float:
    """Size sqrt(w * h) px of the smallest anchor of `model` (its own generator) on this canvas."""
    from ssd_npu.models.detector import build_detector, canvas_anchors  # torch only when needed

    anchors = canvas_anchors(build_detector(num_classes, canvas, model), canvas).numpy()
    wh = anchors[:, 2:] - anchors[:, :2]
    # anchors are clipped to the canvas; the unclipped design sizes are the common values,
    # so take the smallest size that at least 1% of anchors have, not a clipped corner
    return float(np.percentile(np.sqrt(wh[:, 0] * wh[:, 1]), 1))


def fit_row(t: BoxTable, canvas: tuple[int, int], fit: str, anchor_px: float) -> dict[str, Any]:
    """Box sizes on the canvas under one fit, and what falls below the smallest anchor / 1 px."""
    sx, sy, content = fit_scales(t.heights, t.widths, canvas, fit)
    bw = t.box_wh[:, 0] * sx[t.box_image]
    bh = t.box_wh[:, 1] * sy[t.box_image]
    size = np.sqrt(bw * bh)
    n = max(len(size), 1)
    distortion = np.maximum(sx / sy, sy / sx)
    return {
        "canvas": list(canvas),
        "fit": fit,
        "box_size_px": percentiles(size)
        | {"p10": round(float(np.percentile(size, 10)), 2) if len(size) else 0.0},
        "smallest_anchor_px": round(anchor_px, 1),
        "below_smallest_anchor_pct": round(100.0 * float((size < anchor_px).sum()) / n, 2),
        "below_1px_pct": round(100.0 * float((np.minimum(bw, bh) < 1.0).sum()) / n, 3),
        "padding_pct": round(100.0 * float(1.0 - (content / (canvas[0] * canvas[1])).mean()), 2),
        "distortion_p90": round(float(np.percentile(distortion, 90)), 3)
        if len(distortion)
        else 1.0,
        "images_downscaled_pct": round(
            100.0 * float(((sx < 1) | (sy < 1)).sum()) / max(len(sx), 1), 2
        ),
    }


def aspect_canvas(canvas: tuple[int, int], aspect: float, divisor: int = 32) -> tuple[int, int]:
    """A canvas of about the same area whose W/H is the data's median `aspect`, sides % divisor."""
    area = canvas[0] * canvas[1]
    h = max(divisor, round(np.sqrt(area / aspect) / divisor) * divisor)
    w = max(divisor, round(np.sqrt(area * aspect) / divisor) * divisor)
    return int(h), int(w)


def data_report(
    ann_file: str | Path,
    canvas: tuple[int, int],
    num_classes: int,
    batch_size: int = 8,
    model: str = DEFAULT_MODEL,
) -> dict[str, Any]:
    """The full report as a JSON-ready dict (see docs/choosing.md for an example).

    `model`: whose anchors measure the smallest anchor; the aspect-matched canvas is only
    tried where the model's canvas rule allows it (ssd300_vgg16 takes 300x300 only).
    """
    canvas = Canvas.of(canvas)
    t = box_table(load_coco(ann_file))
    aspect = t.widths / t.heights
    shapes, shape_counts = np.unique(np.stack([t.heights, t.widths], 1), axis=0, return_counts=True)
    top = np.argsort(-shape_counts, kind="stable")[:5]
    canvases = [canvas]
    matched = aspect_canvas(canvas, float(np.median(aspect)) if len(aspect) else 1.0)
    if matched != canvas and model_spec(model).canvas_ok(list(matched)):
        canvases.append(matched)
    rows = []
    for c in canvases:
        anchor_px = smallest_anchor(c, num_classes, model)
        rows += [fit_row(t, c, fit, anchor_px) for fit in FITS]
    candidates = sorted({*MAX_BOXES_CANDIDATES, int(t.counts.max()) if len(t.counts) else 1})
    rec = recommend(t, rows, canvas, batch_size)
    sizes = rec["buckets"]
    per = np.bincount(bucket_of(t.counts, sizes), minlength=len(sizes))
    per_bucket = {int(b): int(n) for b, n in zip(sizes, per, strict=True)}
    return {
        "ann_file": str(ann_file),
        "model": model,
        "images": len(t.image_ids),
        "boxes": int(t.counts.sum()),
        "crowd_filtered": t.crowd,
        "degenerate_filtered": t.degenerate,
        "image_shapes": {
            "distinct": len(shapes),
            "most_common": [
                [int(h), int(w), int(n)]
                for (h, w), n in zip(shapes[top], shape_counts[top], strict=True)
            ],
            "height_px": percentiles(t.heights),
            "width_px": percentiles(t.widths),
            "aspect_w_over_h": percentiles(aspect),
        },
        "boxes_per_image": percentiles(t.counts.astype(np.float64))
        | {
            "mean": round(float(t.counts.mean()), 2) if len(t.counts) else 0.0,
            "empty_images": int((t.counts == 0).sum()),
        },
        "max_boxes": [truncation(t.counts, m) for m in candidates],
        "fits": rows,
        "buckets": {
            "sizes": rec["buckets"],
            "images": per_bucket,
            # the bucket sampler drops each bucket's last partial batch every epoch
            "images_unused_per_epoch": int(sum(n % batch_size for n in per_bucket.values())),
            "batch_size": batch_size,
        },
        "recommendation": rec,
    }
