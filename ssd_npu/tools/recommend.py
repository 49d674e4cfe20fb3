"""Recommendation: choose max_boxes, buckets, canvas and fit from the report's statistics.

`recommend` turns the box counts and the per-(canvas, fit) rows of `ssd_npu.tools.data_report` into
the overrides to use, each with its reason; `truncation` and `bucket_padding` are what a
max_boxes or a bucket list costs. The bucket rule itself (`bucket_of`) is the bucket
sampler's (`ssd_npu.data.buckets`), so the report and training agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ssd_npu.data.buckets import bucket_of

if TYPE_CHECKING:
    from ssd_npu.data.box_table import BoxTable

MAX_BOXES_CANDIDATES = (8, 16, 20, 32, 50, 64, 100, 128)
DROP_BUDGET_PCT = 0.1  # recommended max_boxes drops at most this share of boxes
MIN_BATCHES_PER_BUCKET = 2  # a recommended bucket holds at least this many full batches
MAX_DISTORTION = 1.5  # stretch is fine while p90 of max(sx/sy, sy/sx) stays below this
MAX_PAD_SHARE_PCT = 25.0  # fit=pad is fine while padding stays below this share of the canvas


def truncation(counts: np.ndarray, max_boxes: int) -> dict[str, float]:
    """What `max_boxes` costs: images truncated, boxes dropped, padding rows (all percent)."""
    total, n = max(int(counts.sum()), 1), max(len(counts), 1)
    kept = np.minimum(counts, max_boxes).sum()
    return {
        "max_boxes": int(max_boxes),
        "images_truncated_pct": round(100.0 * float((counts > max_boxes).sum()) / n, 3),
        "boxes_dropped_pct": round(100.0 * float(total - kept) / total, 3),
        "padding_rows_pct": round(100.0 * (1.0 - float(kept) / (n * max_boxes)), 2),
    }


def bucket_padding(counts: np.ndarray, buckets: list[int]) -> float:
    """Padding rows (percent) when each image is padded to the smallest bucket holding it."""
    sizes = np.asarray(buckets)
    idx = bucket_of(counts, buckets)
    rows = sizes[idx].sum()
    return round(100.0 * (1.0 - float(np.minimum(counts, sizes[idx]).sum()) / max(rows, 1)), 2)


def _round_up(v: float, step: int = 8) -> int:
    return int(max(step, -(-int(np.ceil(v)) // step) * step))


def merge_small_buckets(counts: np.ndarray, buckets: list[int], min_images: int) -> list[int]:
    """Drop bucket bounds until every bucket holds >= min_images images (or one is left).

    The bucket sampler drops each bucket's last partial batch, so a bucket with fewer images
    than a batch never trains them at all. A bucket that is too small takes in the images of
    the next smaller bucket (whose bound is removed); the smallest one moves up instead.
    """
    sizes = list(buckets)
    while len(sizes) > 1:
        per = np.bincount(bucket_of(counts, sizes), minlength=len(sizes))
        small = [i for i in range(len(sizes)) if per[i] < min_images]
        if not small:
            break
        del sizes[max(small[-1] - 1, 0)]
    return sizes


def recommend(
    t: BoxTable, rows: list[dict[str, Any]], canvas: tuple[int, int], batch_size: int = 8
) -> dict[str, Any]:
    """max_boxes (smallest within the drop budget), buckets, canvas and fit, with the reasons."""
    counts = t.counts
    top = int(counts.max()) if len(counts) else 1
    candidates = sorted({*MAX_BOXES_CANDIDATES, max(top, 1)})
    within = [
        m
        for m in range(1, max(top, 1) + 1)
        if truncation(counts, m)["boxes_dropped_pct"] <= DROP_BUDGET_PCT
    ]
    max_boxes = within[0] if within else candidates[-1]
    cost = truncation(counts, max_boxes)
    p50, p90 = (float(np.percentile(counts, q)) if len(counts) else 1.0 for q in (50, 90))
    buckets = sorted({b for b in (_round_up(p50), _round_up(p90)) if b < max_boxes} | {max_boxes})
    buckets = merge_small_buckets(counts, buckets, MIN_BATCHES_PER_BUCKET * batch_size)
    by = {(tuple(r["canvas"]), r["fit"]): r for r in rows}
    pad, stretch = by[(canvas, "pad")], by[(canvas, "stretch")]
    if pad["images_downscaled_pct"] == 0 and pad["padding_pct"] < MAX_PAD_SHARE_PCT:
        choice, why = (
            pad,
            (
                f"every image fits the canvas and padding is only {pad['padding_pct']}% of it: "
                "fit=pad keeps every pixel unresampled"
            ),
        )
    elif stretch["distortion_p90"] <= MAX_DISTORTION:
        choice, why = (
            stretch,
            (
                f"stretch distorts 90% of images by at most {stretch['distortion_p90']}x (<= "
                f"{MAX_DISTORTION}), uses the whole canvas, keeps boxes largest "
                f"({stretch['below_smallest_anchor_pct']}% below the smallest anchor) and is "
                "torchvision's own ssdlite recipe"
            ),
        )
    else:
        letter = min((r for r in rows if r["fit"] == "letterbox"), key=lambda r: r["padding_pct"])
        choice, why = (
            letter,
            (
                f"stretch would distort 10% of images by more than {MAX_DISTORTION}x "
                f"(p90 {stretch['distortion_p90']}x); letterbox keeps aspect ratios, and canvas "
                f"{letter['canvas']} wastes the least padding ({letter['padding_pct']}%) of the "
                "configured canvas and one of the same area with W/H at the data's median"
                + (" (the same canvas here)" if len(rows) == 3 else "")
            ),
        )
    return {
        "max_boxes": max_boxes,
        "max_boxes_reason": (
            f"smallest max_boxes that drops <= {DROP_BUDGET_PCT}% of boxes: drops "
            f"{cost['boxes_dropped_pct']}%, truncates {cost['images_truncated_pct']}% of images, "
            f"{cost['padding_rows_pct']}% of target rows are padding"
        ),
        "buckets": buckets,
        "buckets_reason": (
            f"buckets at the box-count p50/p90 (rounded up to 8) and max_boxes, each holding "
            f">= {MIN_BATCHES_PER_BUCKET} batches of {batch_size}: padding rows "
            f"fall from {cost['padding_rows_pct']}% to {bucket_padding(counts, buckets)}% with "
            f"at most {len(buckets)} device shapes"
        ),
        "canvas": choice["canvas"],
        "fit": choice["fit"],
        "fit_reason": why,
        "overrides": f"canvas=[{choice['canvas'][0]},{choice['canvas'][1]}] fit={choice['fit']} "
        f"max_boxes={max_boxes}",
    }
