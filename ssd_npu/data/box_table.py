"""The training boxes of a COCO annotation file as flat arrays, without decoding an image.

The same filtering as `CocoDetectionDataset._target` (crowd excluded, boxes clipped to the
image, empty boxes dropped as "degenerate"), as numpy expressions over the whole file, so it
runs in seconds on COCO train2017. The bucket sampler reads its per-image box counts; the
data report (`ssd_npu.tools.data_report`) its sizes.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from ssd_npu.errors import DataError


@dataclass
class BoxTable:
    """Images and their training boxes as flat arrays.

    heights, widths [I] px (from the annotation file); image_ids [I]; counts [I] boxes per
    image after filtering; box_image [N] index into the image arrays; box_wh [N, 2] (w, h) px
    after clipping; crowd, degenerate: annotations filtered out.
    """

    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    counts: np.ndarray
    box_image: np.ndarray
    box_wh: np.ndarray
    crowd: int
    degenerate: int


def load_coco(ann_file: str | Path) -> COCO:
    """pycocotools index of an annotation file, without its progress prints."""
    if not Path(ann_file).is_file():
        raise DataError(
            f"Annotation file {ann_file} does not exist; point data.root at a COCO-format "
            "folder with annotations/instances_<split>.json inside."
        )
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def box_table(coco: COCO, image_ids: list[int] | None = None) -> BoxTable:
    """Vectorised `CocoDetectionDataset._target` filtering over the whole annotation file."""
    ids = np.asarray(sorted(coco.imgs) if image_ids is None else image_ids, dtype=np.int64)
    heights = np.array([coco.imgs[int(i)]["height"] for i in ids], dtype=np.float64)
    widths = np.array([coco.imgs[int(i)]["width"] for i in ids], dtype=np.float64)
    anns = coco.dataset.get("annotations", [])
    ann_img = np.fromiter((a["image_id"] for a in anns), np.int64, len(anns))
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    # image index of each annotation (ids is sorted or given; searchsorted needs sorted)
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], ann_img)
    pos = np.clip(pos, 0, max(len(ids) - 1, 0))
    known = (ids[order][pos] == ann_img) if len(ids) else np.zeros(len(anns), bool)
    img = order[pos]
    h, w = heights[img], widths[img]
    x1, y1 = np.clip(xywh[:, 0], 0, w), np.clip(xywh[:, 1], 0, h)
    x2, y2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, w), np.clip(xywh[:, 1] + xywh[:, 3], 0, h)
    nondegenerate = (x2 > x1) & (y2 > y1)
    keep = known & ~crowd & nondegenerate
    return BoxTable(
        image_ids=ids,
        heights=heights,
        widths=widths,
        counts=np.bincount(img[keep], minlength=len(ids)),
        box_image=img[keep],
        box_wh=np.stack([x2 - x1, y2 - y1], axis=1)[keep],
        crowd=int((known & crowd).sum()),
        degenerate=int((known & ~crowd & ~nondegenerate).sum()),
    )
