"""Detections as pictures: a fixed set of val images with ground truth and predicted boxes.

`DetectionSheet.render()` runs the model on the first N val images (the N smallest image
ids, the same ones every time) with evaluation's own detections function: fixed path,
`FixedDetector` on the canvas, the postprocess where `eval.postprocess` puts it and `unfit_boxes`
back to the original image (`fixed_detections`); dynamic path, the detector's own inference
(`dynamic_detections`). It draws on the ORIGINAL images, decoded by the data set's reader:
ground truth thin in white, predictions with score >= `score` (at most `MAX_PER_IMAGE`) in
a colour per class, labelled "name score". The tiles share one height (aspect kept) and
are laid out in rows: uint8 [3, H, W], what TensorBoard shows as `eval/detections`
and `scripts/show_detections.py` writes as a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from ssd_npu.data.samplers import SampleKey
from ssd_npu.evaluation.evaluate import DetectFn

GT_COLOUR = (255, 255, 255)  # ground truth: white, 1 px
# predictions: one colour per class id (id % len), none of them white
CLASS_COLOURS = [
    (255, 140, 0),
    (0, 200, 255),
    (255, 60, 160),
    (120, 255, 60),
    (170, 110, 255),
    (255, 230, 0),
    (0, 255, 170),
    (255, 90, 60),
]
MAX_PER_IMAGE = 20  # predictions drawn per image, highest scores first
PAD_VALUE = 32  # grid background (uint8 grey)


def draw_tile(
    image: Tensor,
    gt_boxes: Tensor,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    names: dict[int, str],
    score: float = 0.3,
    height: int = 256,
) -> Tensor:
    """One picture: `image` uint8 [3, h, w] resized to `height` px (aspect kept), ground truth
    `gt_boxes` [G, 4] and predictions `boxes` [N, 4] (xyxy, original pixels; `scores` [N],
    `labels` [N] category ids) drawn on it. Returns uint8 [3, height, round(w * height / h)]."""
    h, w = image.shape[-2:]
    scale = height / h
    tile = F.resize(image, [height, max(1, round(w * scale))], antialias=True)
    if len(gt_boxes):
        tile = draw_bounding_boxes(tile, gt_boxes.float() * scale, colors=GT_COLOUR, width=1)
    keep = (scores >= score).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)][:MAX_PER_IMAGE]
    if len(keep):
        ids = labels[keep].tolist()
        tile = draw_bounding_boxes(
            tile,
            boxes[keep].float() * scale,
            labels=[
                f"{names.get(c, c)} {s:.2f}"
                for c, s in zip(ids, scores[keep].tolist(), strict=True)
            ],
            colors=[CLASS_COLOURS[c % len(CLASS_COLOURS)] for c in ids],
            width=2,
        )
    return tile


def tile_grid(tiles: Sequence[Tensor], pad: int = 4) -> Tensor:
    """Tiles uint8 [3, H, w_i] (one height) in rows of ceil(sqrt(n)), `pad` px around each,
    rows right-padded to the widest: uint8 [3, rows * (H + pad) + pad, max row width]."""
    per_row = math.ceil(math.sqrt(len(tiles)))
    height = tiles[0].shape[-2]
    gap = torch.full((3, height, pad), PAD_VALUE, dtype=torch.uint8)
    rows = []
    for i in range(0, len(tiles), per_row):
        row = [gap]
        for tile in tiles[i : i + per_row]:
            row += [tile, gap]
        rows.append(torch.cat(row, dim=-1))
    width = max(r.shape[-1] for r in rows)
    grid = torch.full((3, len(rows) * (height + pad) + pad, width), PAD_VALUE, dtype=torch.uint8)
    for i, row in enumerate(rows):
        top = pad + i * (height + pad)
        grid[:, top : top + height, : row.shape[-1]] = row
    return grid


class DetectionSheet:
    """The first `images` val samples with ground truth and predictions, as one picture.

    detections: evaluation's own (the path's `DetectFn`, bound to the model and device);
    samples: the val loader's data set (`SampleDataset`: `samples[SampleKey]` is a fixed or
    dynamic sample, `samples.base[i]` the original (image, target) from the reader);
    collate / batch_size: the val loader's; `fill`: repeat samples to fill the last batch, so
    the device sees evaluation's batch shape (the fixed path). names: category id -> name.
    """

    def __init__(
        self,
        detections: DetectFn,
        samples: Any,
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        names: dict[int, str],
        fill: bool = True,
        images: int = 6,
        score: float = 0.3,
        height: int = 256,
    ) -> None:
        self.detections, self.samples, self.collate = detections, samples, collate
        self.batch_size, self.names, self.fill = batch_size, names, fill
        self.score, self.height = score, height
        self.count = min(images, len(samples))

    @classmethod
    def from_loader(cls, detections: DetectFn, loader: Any, fill: bool, **kwargs: Any):
        """A sheet on a val DataLoader from `build_loaders` (its data set, collate, batch)."""
        names = {int(k): c["name"] for k, c in loader.dataset.base.coco.cats.items()}
        return cls(
            detections, loader.dataset, loader.collate_fn, loader.batch_size, names, fill, **kwargs
        )

    def _batches(self) -> list[Any]:
        keys = [SampleKey(i) for i in range(self.count)]
        if self.fill:  # evaluation's batch shape: fill with repeats (image_id -1)
            fill = -len(keys) % self.batch_size
            keys += [SampleKey(i % self.count, pad=True) for i in range(fill)]
        step = self.batch_size
        return [
            self.collate([self.samples[k] for k in keys[i : i + step]])
            for i in range(0, len(keys), step)
        ]

    def predictions(self) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """image_id -> (boxes [N, 4] xyxy original pixels, scores [N], labels [N] category ids),
        evaluation's own detections (score >= 0.001, NMS, at most 300 per image)."""
        results = self.detections(self._batches()).results  # [N, 7], rows grouped by image
        rows = torch.from_numpy(results)
        out = {}
        for image_id in rows[:, 0].unique().tolist():
            mine = rows[rows[:, 0] == image_id]
            boxes = torch.cat([mine[:, 1:3], mine[:, 1:3] + mine[:, 3:5]], dim=1).float()
            out[int(image_id)] = (boxes, mine[:, 5].float(), mine[:, 6].long())
        return out

    def render(self) -> Tensor:
        """The grid: uint8 [3, H, W] (tiles `height` px high, ceil(sqrt(images)) columns)."""
        predictions = self.predictions()
        empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        tiles = []
        for i in range(self.count):
            image, target = self.samples.base[i]  # the original, decoded by the reader
            boxes, scores, labels = predictions.get(int(target["image_id"]), empty)
            tiles.append(
                draw_tile(
                    image.as_subclass(Tensor),
                    target["boxes"].as_subclass(Tensor),
                    boxes,
                    scores,
                    labels,
                    self.names,
                    self.score,
                    self.height,
                )
            )
        return tile_grid(tiles)


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a uint8 [3, H, W] picture as a PNG (folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid.cpu(), str(path))
    return path
