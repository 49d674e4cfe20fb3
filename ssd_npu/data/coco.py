"""COCO-format detection data set (pycocotools) returning tv_tensors for transforms v2.

Reads `root/annotations/instances_{split}.json` and images from `root/{split}/`. Problems the
user can fix (missing or malformed files, unknown categories, corrupt images) raise
`DataError` with one sentence that names the file and what to do.

Memory: the data set keeps its annotations as flat numpy arrays (`box_table.Annotations`),
not a pycocotools index, so DataLoader workers share its pages with the main process (see
docs/bench.md, "Data set memory"). The pycocotools index (`coco`) is built only for
evaluation's ground truth (`ground_truth=True`) or when something asks for it.
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

from ssd_npu.data.box_table import Annotations, box_table, read_annotations
from ssd_npu.data.decode import DeferredImage, check_decode, decode_rgb
from ssd_npu.errors import DataError

_SEGMENTATION = b'"segmentation":'


def _without_segmentation(raw: bytes) -> bytearray:
    """The file's bytes with every segmentation value replaced by null, for a parse that makes
    no Python object of the polygons (most of a COCO file's text; training never reads them).

    Only compact values are cut: a polygon list `[[...]]` (numbers only: its first "]]" ends
    it), `[]`, or an RLE object `{...}` (its counts, a list or an RLE string, hold no brace).
    Raises ValueError on anything else (e.g. pretty-printed JSON): the caller parses it all.
    """
    out, view, pos = bytearray(), memoryview(raw), 0
    # views, not slices: no copy of the file's pieces (900k of them in train2017) whose
    # freed memory would stay in the heap; `out` is one buffer, returned whole when freed
    while (at := raw.find(_SEGMENTATION, pos)) >= 0:
        value = at + len(_SEGMENTATION)
        while raw[value : value + 1].isspace():
            value += 1
        head = raw[value : value + 2]
        if head == b"[[":
            end = raw.index(b"]]", value) + 2
        elif head == b"[]":
            end = value + 2
        elif head[:1] == b"{":
            end = raw.index(b"}", value) + 1
        else:
            raise ValueError("segmentation value of an unexpected form")
        out += view[pos:value]
        out += b"null"
        pos = end
    out += view[pos:]
    return out


def _parse(path: Path, boxes_only: bool) -> Any:
    """json.loads of the file; boxes_only: without its segmentation values (None) where the
    file allows the fast cut, the same dict otherwise."""
    raw = path.read_bytes()
    if boxes_only:
        try:
            return json.loads(_without_segmentation(raw))
        except ValueError:  # an unexpected form, or invalid JSON: the full parse says which
            pass
    return json.loads(raw)


def _load_json(path: Path, boxes_only: bool = False) -> dict[str, Any]:
    """The parsed annotation file (DataError for a missing, malformed or non-COCO file);
    boxes_only: segmentation values dropped (None): a faster parse that holds no polygon."""
    if not path.is_file():
        raise DataError(
            f"Annotation file {path} does not exist; point data.root at a COCO-format folder "
            "with annotations/instances_<split>.json inside."
        )
    try:
        data = _parse(path, boxes_only)
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


def target_from_xywh(
    xywh: np.ndarray, labels: np.ndarray, image_id: int, h: int, w: int
) -> dict[str, Any]:
    """A training target from COCO boxes: xywh float32 [N, 4] px and labels int64 [N] of an
    h x w px image -> boxes [K, 4] XYXY clipped to the image, labels [K], with the N - K
    degenerate boxes (empty after clipping) dropped and counted, and the clipped ones counted.
    """
    # numpy, then one tensor per field: torch ops on a few boxes cost more in overhead
    raw = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes = raw.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    clipped = (boxes != raw).any(axis=1) & keep
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.from_numpy(boxes[keep]), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.from_numpy(labels[keep]),
        "image_id": image_id,
        "orig_size": (h, w),
        "degenerate": int((~keep).sum()),
        "clipped": int(clipped.sum()),  # kept, but reached outside the image
    }


class CocoDetectionDataset(torch.utils.data.Dataset):
    """COCO detection samples: `(image, target)`.

    image: `tv_tensors.Image` uint8 [3, h, w] RGB (L, P, RGBA, CMYK, ... converted by PIL);
    with `decode="reduced"` (or "device") a `DeferredImage` instead (size from the file header; the fit
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

    Held per image: `image_ids` [I] int64 (sorted; `ids` the same as a list), `file_names`
    [I], `sizes` [I, 2] (h, w) from the file, `box_counts` [I] (training boxes at those sizes,
    for the bucket sampler), and a slice into flat non-crowd xywh float32 [N, 4] / labels
    int64 [N] arrays. ground_truth: also keep the pycocotools index (`coco`, for COCOeval)
    from the same parse; otherwise the parse skips the segmentation values.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms: Callable | None = None,
        on_bad_image: str = "fail",
        decode: str = "exact",
        ground_truth: bool = False,
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
        # parsed once for the arrays, the counts and the index (evaluation needs its masks)
        data = _load_json(self.ann_file, boxes_only=not ground_truth)
        table = read_annotations(data, self.ann_file)
        self._coco: COCO | None = _index(data) if ground_truth else None
        del data
        self._keep(table)

    def _keep(self, table: Annotations) -> None:
        """Keep what training reads (non-crowd boxes and labels per image, file names) and the
        bucket sampler's counts; drop the rest of the parse."""
        self.image_ids: np.ndarray = table.image_ids  # [I] int64, sorted: what samples read
        # the same as a list (the public `ids`): only callers outside the sample path read it,
        # so workers leave its int objects' pages shared
        self.ids: list[int] = table.image_ids.tolist()
        self.file_names: np.ndarray = table.file_names  # [I] str
        # [I, 2] (h, w) px as the file states them (the decoded size is what samples use)
        self.sizes: np.ndarray = np.stack([table.heights, table.widths], axis=1).astype(np.int64)
        self.category_ids: list[int] = table.category_ids.tolist()
        self.max_category_id = max(self.category_ids, default=0)
        # per image after crowd/degenerate filtering at the file's sizes (bucket sampler)
        self.box_counts: np.ndarray = box_table(table).counts
        keep = ~table.crowd
        image = np.repeat(np.arange(len(self.ids)), np.diff(table.start))[keep]
        self._start = np.zeros(len(self.ids) + 1, np.int64)  # image i: rows start[i]:start[i+1]
        np.cumsum(np.bincount(image, minlength=len(self.ids)), out=self._start[1:])
        # float32 as the previous reader's np.array(bbox lists, float32): the same rounding
        self._xywh = table.xywh[keep].astype(np.float32)  # [N, 4]
        self._labels = table.labels[keep]  # [N] int64

    @property
    def coco(self) -> COCO:
        """The pycocotools index (evaluation's ground truth); built from the file on first use
        unless the data set was made with ground_truth=True. Training never needs it."""
        if self._coco is None:
            self._coco = _index(_load_json(self.ann_file))
        return self._coco

    def __len__(self) -> int:
        return len(self.ids)

    def _load_image(self, index: int) -> Tensor | DeferredImage:
        img_id = int(self.image_ids[index])
        path = self.img_dir / str(self.file_names[index])
        if not path.is_file():
            raise DataError(
                f"Image file {path} (image_id {img_id}) is missing; restore it, remove its entry "
                f"from {self.ann_file.name}, or set data.on_bad_image=skip."
            )
        name = f"{path} (image_id {img_id})"
        # the header only: the fit (reduced) or the device (data.decode=device) decodes
        if self.decode in ("reduced", "device"):
            return DeferredImage.open(path, skip_bad=self.on_bad_image == "skip", name=name)
        return decode_rgb(path, name)  # a full decode: truncation shows here

    def target(self, index: int, h: int, w: int) -> dict[str, Any]:
        """Image `index`'s target for an image of h x w px (the decoded size), without decoding:
        boxes float32 [N, 4] XYXY clipped, labels int64 [N] (see the class docstring)."""
        lo, hi = self._start[index], self._start[index + 1]
        return target_from_xywh(
            self._xywh[lo:hi], self._labels[lo:hi], int(self.image_ids[index]), h, w
        )

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image | DeferredImage, dict[str, Any]]:
        skipped = 0
        for attempt in range(len(self.ids)):
            at = (index + attempt) % len(self.ids)
            try:
                image = self._load_image(at)
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
        target = self.target(at, h, w)
        target["skipped"] = skipped
        if isinstance(image, Tensor):
            image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _index(data: dict[str, Any]) -> COCO:
    """pycocotools' index of a parsed annotation file, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_num_classes(dataset: CocoDetectionDataset, num_classes: int) -> None:
    """Raise DataError if a category id does not fit `num_classes` (background 0 included)."""
    if dataset.max_category_id >= num_classes:
        raise DataError(
            f"data.num_classes={num_classes} is too small for category id {dataset.max_category_id} "
            f"in {dataset.ann_file}; set data.num_classes={dataset.max_category_id + 1} or more."
        )
