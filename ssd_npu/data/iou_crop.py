"""SSD's random IoU crop, vectorised: torchvision's `RandomIoUCrop`, the same crops, faster.

torchvision's `v2.RandomIoUCrop` tries up to 40 crops per round one at a time in Python
(about 100 us each, several ms per image when the minimum IoU is high and rounds fail).
Here a round draws all its trials at once and tests them together in numpy; the first
trial that passes is the crop. The tests are torchvision's, in the same dtypes (float32
scale, truncation to int, float64 aspect ratio, float32 centres and IoU), so a trial
passes here exactly when it would pass there. Only the order in which random numbers are
drawn differs (a round draws `trials x 4` at once), so for a given seed the crop is not
torchvision's, but its distribution is (tests/test_iou_crop.py compares the two).

Randomness comes from torch's global generator (`torch.randint`, `torch.rand`), as in
torchvision, so the loader's per-sample seeding applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class CropParams(NamedTuple):
    """A crop of the image: rows top..top+height, columns left..left+width (pixels)."""

    top: int
    left: int
    height: int
    width: int
    keep: np.ndarray  # [N] bool: the boxes whose centre lies strictly inside the crop


@dataclass(frozen=True)
class IoUCropSampler:
    """torchvision's `RandomIoUCrop` parameters (the same names and defaults).

    Call with boxes [N, 4] xyxy float32 pixels (N >= 1) and the image size (h, w); returns
    CropParams, or None for the "leave the image as it is" option (a minimum IoU >= 1).
    """

    min_scale: float = 0.3
    max_scale: float = 1.0
    min_aspect_ratio: float = 0.5
    max_aspect_ratio: float = 2.0
    sampler_options: tuple[float, ...] = field(default=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0))
    trials: int = 40

    def __call__(self, boxes: Tensor | np.ndarray, size: tuple[int, int]) -> CropParams | None:
        if boxes.shape[0] == 0:
            # torchvision would loop until it drew the leave-as-is option: no candidate crop
            # can contain a box centre. Callers skip the crop for images without boxes.
            raise ValueError("IoUCropSampler needs at least one box")
        h, w = int(size[0]), int(size[1])
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        cx, cy = np.float32(0.5) * (b[:, 0] + b[:, 2]), np.float32(0.5) * (b[:, 1] + b[:, 3])
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # [N] float32, as box_iou's box_area
        span = self.max_scale - self.min_scale
        while True:
            idx = int(torch.randint(low=0, high=len(self.sampler_options), size=(1,)))
            threshold = self.sampler_options[idx]
            if threshold >= 1.0:
                return None
            r = torch.rand(self.trials, 4).numpy()  # [T, 4]: scale (w, h), position (x, y)
            found = self._round(r, threshold, h, w, b, cx, cy, area, span)
            if found is not None:
                return found

    def _round(self, r, threshold, h, w, b, cx, cy, area, span) -> CropParams | None:
        """Test all trials of one round; the first that passes, or None."""
        # float32 products truncated to int, as `int(orig_w * r[0])` on a float32 tensor
        scale = np.float32(self.min_scale) + np.float32(span) * r[:, :2]
        new_w = (np.float32(w) * scale[:, 0]).astype(np.int64)
        new_h = (np.float32(h) * scale[:, 1]).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):  # new_h == 0: never passes
            aspect = new_w / new_h  # float64, as Python's int / int
        ok = (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio)
        left = ((w - new_w).astype(np.float32) * r[:, 2]).astype(np.int64)
        top = ((h - new_h).astype(np.float32) * r[:, 3]).astype(np.int64)
        right, bottom = left + new_w, top + new_h
        ok &= (new_w > 0) & (new_h > 0)
        if not ok.any():
            return None
        # [T, N]: box centres strictly inside each candidate crop (float32 compares)
        lf, tf, rf, bf = (v.astype(np.float32)[:, None] for v in (left, top, right, bottom))
        inside = (lf < cx) & (cx < rf) & (tf < cy) & (cy < bf)
        ok &= inside.any(axis=1)
        if not ok.any():
            return None
        # IoU of every box with every crop, box_iou's float32 arithmetic
        iw = np.clip(np.minimum(b[:, 2], rf) - np.maximum(b[:, 0], lf), 0, None)
        ih = np.clip(np.minimum(b[:, 3], bf) - np.maximum(b[:, 1], tf), 0, None)
        inter = iw * ih
        iou = inter / (area + (rf - lf) * (bf - tf) - inter)
        best = np.where(inside, iou, np.float32(-1)).max(axis=1)
        ok &= ~(best < np.float32(threshold))  # torchvision: `if ious.max() < t: continue`
        if not ok.any():
            return None
        t = int(np.argmax(ok))  # the first passing trial, as the sequential loop returns
        return CropParams(int(top[t]), int(left[t]), int(new_h[t]), int(new_w[t]), inside[t].copy())


def crop_boxes(boxes: np.ndarray, params: CropParams) -> np.ndarray:
    """Boxes [N, 4] xyxy image px (float32) -> crop px: shifted, clamped to the crop, and
    zeroed where the centre is outside the crop (then dropped by `sanitize`): torchvision's
    crop of BoundingBoxes, in the same float32 arithmetic."""
    out = boxes - np.array([params.left, params.top, params.left, params.top], np.float32)
    out[:, 0::2] = out[:, 0::2].clip(0, params.width)
    out[:, 1::2] = out[:, 1::2].clip(0, params.height)
    out[~params.keep] = 0
    return out


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror boxes [N, 4] xyxy (float32) in an image `width` px wide: torchvision's
    `-(x - width)`, with x1 and x2 swapped."""
    out = boxes.copy()
    out[:, [2, 0]] = -(boxes[:, [0, 2]] - np.float32(width))
    return out


def sanitize(
    boxes: np.ndarray, size: tuple[int, int], min_size: float = 1.0, min_area: float = 1.0
) -> np.ndarray:
    """[N] bool: the boxes [N, 4] xyxy px (float32) that `SanitizeBoundingBoxes()` keeps in an
    image of `size` (h, w): sides >= min_size px, area >= min_area px^2, inside the image."""
    h, w = size
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    valid = (ws >= min_size) & (hs >= min_size) & (boxes >= 0).all(axis=-1) & (ws * hs >= min_area)
    valid &= (boxes[:, 0] <= w) & (boxes[:, 2] <= w) & (boxes[:, 1] <= h) & (boxes[:, 3] <= h)
    return valid
