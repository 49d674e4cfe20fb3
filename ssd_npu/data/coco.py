"""COCO-format detection data set (pycocotools) returning tv_tensors for transforms v2.

Reads `root/annotations/instances_{split}.json` and images from `root/{split}/`. Problems the
user can fix (missing or malformed files, unknown categories, corrupt images) raise
`DataError` with one sentence that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torchvision import tv_tensors

from ssd_npu.data.decode import DeferredImage, check_decode, decode_rgb
from ssd_npu.errors import DataError


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(
            f"Annotation file {path} does not exist; point data.root at a COCO-format folder "
            "with annotations/instances_<split>.json inside."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"Annotation file {path} is not valid JSON ({e}); re-download or regenerate it."
        ) from e
    if not isinstance(data, dict) or not all(
        k in data for k in ("images", "annotations", "categories")
    ):
        raise DataError(
            f"Annotation file {path} lacks the COCO keys 'images', 'annotations' and 'categories'; "
            "give a COCO instances_*.json file."
        )
    return data


class CocoDetectionDataset(torch.utils.data.Dataset):
    """COCO detection samples: `(image, target)`.

    image: `tv_tensors.Image` uint8 [3, h, w] RGB (L, P, RGBA, CMYK, ... converted by PIL);
    with `decode="reduced"` a `DeferredImage` instead (size from the file header; the fit
    decodes it at the scale the canvas needs: `ssd_npu.data.decode`).
    target: `boxes` `tv_tensors.BoundingBoxes` XYXY float32 [N, 4] in original pixels
    (crowd annotations excluded, boxes clipped to the image, boxes empty after clipping
    dropped); `labels` int64 [N] = COCO category_id; `image_id` int; `orig_size` (h, w);
    `degenerate` int (boxes dropped here); `skipped` int (bad images skipped to reach this one).

    on_bad_image: "fail" raises `DataError` on a missing or undecodable image file; "skip"
    warns and returns the next good image instead. The count of skipped images travels in
    each target as `skipped` (valid across DataLoader workers); `self.skipped` counts only
    what this process (the main one when num_workers=0) has skipped. With `decode="reduced"`
    a file that opens but turns out corrupt when decoded becomes an empty sample (counted in
    `skipped` by FixSample) instead, as the next image would need its own augmentation.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms: Callable | None = None,
        on_bad_image: str = "fail",
        decode: str = "exact",
    ) -> None:
        if on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image={on_bad_image!r}; choose fail or skip")
        self.decode = check_decode(decode)
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise DataError(
                f"Data root {self.root} does not exist; set data.root to a COCO-format folder."
            )
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.img_dir = self.root / split
        self.transforms, self.on_bad_image, self.skipped = transforms, on_bad_image, 0
        data = _load_json(self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self._check(data)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.category_ids: list[int] = sorted(self.coco.cats)
        self.max_category_id = max(self.category_ids, default=0)

    def _check(self, data: dict[str, Any]) -> None:
        images = {img["id"] for img in data["images"]}
        cats = {c["id"] for c in data["categories"]}
        for ann in data["annotations"]:
            if ann.get("category_id") not in cats:
                raise DataError(
                    f"Annotation file {self.ann_file}: annotation {ann.get('id')} has category_id "
                    f"{ann.get('category_id')}, which is not in 'categories'; fix the annotation "
                    "or add the category."
                )
            if ann.get("image_id") not in images:
                raise DataError(
                    f"Annotation file {self.ann_file}: annotation {ann.get('id')} points to image_id "
                    f"{ann.get('image_id')}, which is not in 'images'; fix or remove the annotation."
                )

    def __len__(self) -> int:
        return len(self.ids)

    def _load_image(self, img_id: int) -> Tensor | DeferredImage:
        path = self.img_dir / self.coco.imgs[img_id]["file_name"]
        if not path.is_file():
            raise DataError(
                f"Image file {path} (image_id {img_id}) is missing; restore it, remove its entry "
                f"from {self.ann_file.name}, or set data.on_bad_image=skip."
            )
        name = f"{path} (image_id {img_id})"
        if self.decode == "reduced":  # the header only: the fit decodes (ssd_npu.data.decode)
            return DeferredImage.open(path, skip_bad=self.on_bad_image == "skip", name=name)
        return decode_rgb(path, name)  # a full decode: truncation shows here

    def _target(self, img_id: int, h: int, w: int) -> dict[str, Any]:
        # numpy, then one tensor per field: torch ops on a few boxes cost more in overhead
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        raw = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = raw.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        clipped = (boxes != raw).any(axis=1) & keep
        labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes[keep]), format="XYXY", canvas_size=(h, w)
            ),
            "labels": torch.from_numpy(labels[keep]),
            "image_id": int(img_id),
            "orig_size": (h, w),
            "degenerate": int((~keep).sum()),
            "clipped": int(clipped.sum()),  # kept, but reached outside the image
        }

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image | DeferredImage, dict[str, Any]]:
        skipped = 0
        for attempt in range(len(self.ids)):
            img_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                image = self._load_image(img_id)
                break
            except DataError as e:
                if self.on_bad_image == "fail":
                    raise
                warnings.warn(f"skipping bad image: {e}", stacklevel=2)
                skipped += 1
                self.skipped += 1
        else:
            raise DataError(f"No image under {self.img_dir} can be decoded; check the data set.")
        h, w = int(image.shape[-2]), int(image.shape[-1])
        target = self._target(img_id, h, w)
        target["skipped"] = skipped
        if isinstance(image, Tensor):
            image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def check_num_classes(dataset: CocoDetectionDataset, num_classes: int) -> None:
    """Raise DataError if a category id does not fit `num_classes` (background 0 included)."""
    if dataset.max_category_id >= num_classes:
        raise DataError(
            f"data.num_classes={num_classes} is too small for category id {dataset.max_category_id} "
            f"in {dataset.ann_file}; set data.num_classes={dataset.max_category_id + 1} or more."
        )
