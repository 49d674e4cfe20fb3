"""The training boxes of a COCO annotation file as flat arrays, without decoding an image.

The same filtering as `CocoDetectionDataset.target` (crowd excluded, boxes clipped to the
image, empty boxes dropped as "degenerate"), as numpy expressions over the whole file, so it
runs in seconds on COCO train2017. The bucket sampler reads its per-image box counts; the
data report (`ssd_npu.tools.data_report`) its sizes.

`read_annotations` turns a parsed annotation file into the flat `Annotations` the training
data set keeps instead of a pycocotools index: a few numpy arrays, no Python object per
image or annotation, so forked DataLoader workers share its pages (reading a Python object
writes its reference count, which un-shares the page it lies on).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_MISSING = np.iinfo(np.int64).min  # an absent id: matches no image and no category


@dataclass
class Annotations:
    """One annotation file's images and boxes as flat numpy arrays.

    Images, sorted by id: image_ids [I] int64; heights, widths [I] float64 px (the file's
    sizes); file_names [I] str. Annotations grouped by image, in file order within an image
    (pycocotools' `imgToAnns` order): image i's are rows start[i]:start[i + 1] (start [I + 1]
    int64) of xywh [A, 4] float64 px, labels [A] int64 (category_id) and crowd [A] bool.
    category_ids [C] int64, sorted.
    """

    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    file_names: np.ndarray
    start: np.ndarray
    xywh: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    category_ids: np.ndarray


def _ints(values: Any, count: int) -> np.ndarray:
    return np.fromiter(values, np.int64, count)


def read_annotations(data: dict[str, Any], source: str | Path) -> Annotations:
    """Flat arrays of a parsed COCO annotation file (`source` names it in errors).

    Raises DataError on the first annotation (in file order) whose category_id is not in
    'categories' or whose image_id is not in 'images'. A repeated image id keeps its last
    entry, as pycocotools' index does.
    """
    images, anns = data["images"], data["annotations"]
    all_ids = _ints((im["id"] for im in images), len(images))
    # last entry of each id (np.unique takes the first, so look from the end)
    ids, last = np.unique(all_ids[::-1], return_index=True)
    rows = len(images) - 1 - last
    cats = np.unique(_ints((c["id"] for c in data["categories"]), len(data["categories"])))
    ann_img = _ints((a.get("image_id", _MISSING) for a in anns), len(anns))
    labels = _ints((a.get("category_id", _MISSING) for a in anns), len(anns))
    pos = np.clip(np.searchsorted(ids, ann_img), 0, max(len(ids) - 1, 0))
    known = ids[pos] == ann_img if len(ids) else np.zeros(len(anns), bool)
    _check_ids(anns, ~np.isin(labels, cats), ~known, source)
    # group by image, file order within an image (a stable sort)
    group = np.argsort(pos, kind="stable")
    xywh = np.array([anns[k]["bbox"] for k in group], dtype=np.float64).reshape(-1, 4)
    crowd = np.fromiter((bool(anns[k].get("iscrowd", 0)) for k in group), bool, len(anns))
    start = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(np.bincount(pos, minlength=len(ids)), out=start[1:])
    return Annotations(
        image_ids=ids,
        # a size absent from the file counts as 0 (only box_table reads these sizes)
        heights=np.array([images[r].get("height", 0) for r in rows], dtype=np.float64),
        widths=np.array([images[r].get("width", 0) for r in rows], dtype=np.float64),
        file_names=np.array([images[r]["file_name"] for r in rows], dtype=np.str_),
        start=start,
        xywh=xywh,
        labels=labels[group],
        crowd=crowd,
        category_ids=cats,
    )


def _check_ids(
    anns: list[dict[str, Any]], bad_cat: np.ndarray, bad_img: np.ndarray, source: str | Path
) -> None:
    """DataError for the first annotation with an unknown category or image (category first)."""
    bad = bad_cat | bad_img
    if not bad.any():
        return
    k = int(np.argmax(bad))
    ann = anns[k]
    if bad_cat[k]:
        raise DataError(
            f"Annotation file {source}: annotation {ann.get('id')} has category_id "
            f"{ann.get('category_id')}, which is not in 'categories'; fix the annotation "
            "or add the category."
        )
    raise DataError(
        f"Annotation file {source}: annotation {ann.get('id')} points to image_id "
        f"{ann.get('image_id')}, which is not in 'images'; fix or remove the annotation."
    )


def load_coco(ann_file: str | Path) -> COCO:
    """pycocotools index of an annotation file, without its progress prints."""
    if not Path(ann_file).is_file():
        raise DataError(
            f"Annotation file {ann_file} does not exist; point data.root at a COCO-format "
            "folder with annotations/instances_<split>.json inside."
        )
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def box_table(source: COCO | Annotations, image_ids: list[int] | None = None) -> BoxTable:
    """Vectorised `CocoDetectionDataset.target` filtering over the whole annotation file.

    source: a pycocotools index (image_ids: a subset, default all sorted) or the flat
    `Annotations` of `read_annotations` (all its images; image_ids ignored).
    """
    if isinstance(source, Annotations):
        img = np.repeat(np.arange(len(source.image_ids)), np.diff(source.start))
        known = np.ones(len(img), bool)
        return _filter(
            source.image_ids, source.heights, source.widths, img, known, source.crowd, source.xywh
        )
    coco = source
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
    img = order[pos] if len(ids) else np.zeros(len(anns), np.int64)
    return _filter(ids, heights, widths, img, known, crowd, xywh)


def _filter(
    ids: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    img: np.ndarray,
    known: np.ndarray,
    crowd: np.ndarray,
    xywh: np.ndarray,
) -> BoxTable:
    """The filtering itself: img [A] image index of each annotation (valid where known [A])."""
    if len(ids) == 0:  # no image: every annotation is unknown
        img, known = np.zeros(len(crowd), np.int64), np.zeros(len(crowd), bool)
    h = heights[img] if len(ids) else np.zeros(len(img))
    w = widths[img] if len(ids) else np.zeros(len(img))
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
