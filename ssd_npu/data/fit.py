"""Fit one image to the canvas: stretch | letterbox | pad, padding only right and bottom.

- stretch: resize to (H, W) ignoring aspect ratio; the same pixels and boxes as torchvision's
  `GeneralizedRCNNTransform` of ssdlite (whose `fixed_size` is given as (W, H)).
- letterbox: resize by s = min(H/h, W/w), keep aspect ratio, pad with `pad_value`.
- pad: no resize, pad; an image larger than the canvas is first scaled down to fit it.

`fit_to_canvas` (data.decode=exact) works on a decoded uint8 image and gives float32 in
[0, 1], torchvision's pixels; `fit_deferred` (data.decode=reduced) decodes a
`DeferredImage` at reduced scale and gives uint8 (normalised on the device).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes

from ssd_npu.choices import FITS as FIT_MODES
from ssd_npu.choices import Canvas
from ssd_npu.data.decode import DeferredImage, fill_value


class FitInfo(NamedTuple):
    """How one image was fitted: canvas_xy = orig_xy * scale."""

    scale: tuple[float, float]  # (sx, sy)
    orig_size: tuple[int, int]  # (h, w) of the image given to the fit
    content_size: tuple[int, int]  # (h, w) of the image inside the canvas
    downscaled: bool  # fit=pad only: the image was larger than the canvas


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    # bilinear, align_corners=False, no antialias: what GeneralizedRCNNTransform does
    return F.interpolate(image[None], size=list(size), mode="bilinear", align_corners=False)[0]


def _to_float(image: Tensor) -> Tensor:
    """uint8 [3, h, w] (any strides; a crop is a view) -> float32 [3, h, w] in [0, 1], stored
    channels-last.

    /255 first, then resize: torchvision's order (ToDtype(scale=True) in the recipe, resize in
    the model), with to_dtype's arithmetic (x.to(float32) * (1 / 255)). Channels-last because
    torch's CPU bilinear resize of a 3-channel image on one thread (DataLoader workers) runs
    its channels-last kernel anyway, after a transposing copy of a contiguous input: this
    skips that copy, with the same kernel and so the same pixels.
    """
    if image.is_floating_point():  # to_dtype's float -> float: a plain cast, no scaling
        return image.to(torch.float32)
    out = torch.empty((image.shape[1], image.shape[2], image.shape[0]), dtype=torch.float32)
    out = out.permute(2, 0, 1)
    out.copy_(image)
    return out.mul_(1.0 / torch.iinfo(image.dtype).max)


def content_size(h: int, w: int, canvas: tuple[int, int], mode: str) -> tuple[int, int, bool]:
    """(ch, cw, downscaled): the size (px) of an h x w image inside the canvas (H, W)."""
    if mode not in FIT_MODES:
        raise ValueError(f"fit={mode!r} is not valid; choose one of: {', '.join(FIT_MODES)}")
    H, W = Canvas.of(canvas)
    if mode == "stretch":
        return H, W, False
    if mode == "pad" and h <= H and w <= W:
        return h, w, False
    # s = min(H / h, W / w), each side round(side * s) on the exact ratio (ties to even): the
    # same integers the device fit computes (ssd_npu/data/device_augment.py), where float64
    # would round 213 * 224 / 192 = 248.5 up to 249 and the exact ratio to 248
    if H * w <= W * h:
        ch, cw = H, _round_ratio(w * H, h)
    else:
        ch, cw = _round_ratio(h * W, w), W
    return max(1, min(H, ch)), max(1, min(W, cw)), mode == "pad"


def _round_ratio(num: int, den: int) -> int:
    """round(num / den) for non-negative ints, ties to even, without float rounding."""
    q, rem = divmod(num, den)
    return q + int(2 * rem > den or (2 * rem == den and q % 2 == 1))


def _ratios(ch: int, cw: int, h: int, w: int) -> tuple[float, float]:
    # float32 ratios (sx, sy), exactly the ones resize_boxes multiplies by
    sy, sx = (
        float(torch.tensor(n, dtype=torch.float32) / torch.tensor(o, dtype=torch.float32))
        for n, o in ((ch, h), (cw, w))
    )
    return sx, sy


def fit_to_canvas(
    image: Tensor,
    boxes: Tensor,
    canvas: tuple[int, int],
    mode: str = "stretch",
    pad_value: float = 0.0,
) -> tuple[Tensor, Tensor, FitInfo]:
    """Fit one image to the canvas.

    image uint8 [3, h, w]; boxes float32 [N, 4] xyxy original pixels; canvas (H, W).
    Returns image float32 [3, H, W] in [0, 1], boxes float32 [N, 4] xyxy canvas pixels (clipped
    to the content area), FitInfo.
    """
    H, W = Canvas.of(canvas)  # the public entry: any [H, W] pair
    h, w = int(image.shape[-2]), int(image.shape[-1])
    ch, cw, downscaled = content_size(h, w, (H, W), mode)
    x = _to_float(image.as_subclass(Tensor))
    boxes = boxes.as_subclass(Tensor).to(torch.float32).reshape(-1, 4)
    content = x if (ch, cw) == (h, w) and mode == "pad" else _resize(x, (ch, cw))
    if mode == "stretch":
        out = content.contiguous()
    else:
        out = x.new_full((3, H, W), float(pad_value))
        out[:, :ch, :cw] = content
    out_boxes = _clip(resize_boxes(boxes, [h, w], [ch, cw]), ch, cw)
    return out, out_boxes, FitInfo(_ratios(ch, cw, h, w), (h, w), (ch, cw), downscaled)


def fit_deferred(
    image: DeferredImage,
    boxes: Tensor,
    canvas: tuple[int, int],
    mode: str = "stretch",
    pad_value: float = 0.0,
) -> tuple[Tensor, Tensor, FitInfo] | None:
    """`fit_to_canvas` for `data.decode=reduced`: decode at reduced scale, resize in uint8.

    Returns image uint8 [3, H, W] (0..255; the device divides by 255), boxes float32 [N, 4]
    xyxy canvas pixels clipped to the content, FitInfo; None for a corrupt file skipped.
    """
    _, h, w = image.shape
    ch, cw, downscaled = content_size(h, w, canvas, mode)
    fitted = image.decode_fit(canvas, (ch, cw), fill_value(pad_value))
    if fitted is None:
        return None
    out, scale, offset = fitted
    boxes = boxes.as_subclass(Tensor).to(torch.float32).reshape(-1, 4)
    out_boxes = _clip((boxes + offset) * scale, ch, cw)
    return out, out_boxes, FitInfo(_ratios(ch, cw, h, w), (h, w), (ch, cw), downscaled)


def _clip(boxes: Tensor, h: float, w: float) -> Tensor:
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def unfit_boxes(boxes: Tensor, info: FitInfo) -> Tensor:
    """Inverse of the fit's box mapping: canvas pixels [N, 4] -> original pixels [N, 4], clipped."""
    sx, sy = info.scale
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=boxes.device)
    return _clip(boxes.to(torch.float32) / scale, *info.orig_size)


def empty_fit(
    image: DeferredImage, canvas: tuple[int, int], pad_value: float
) -> tuple[Tensor, Tensor, FitInfo]:
    """A blank uint8 canvas without boxes: it adds nothing to the SSD loss (no positives, so
    no hard negatives either) and keeps the batch shape."""
    out = torch.full((3, *canvas), fill_value(pad_value), dtype=torch.uint8)
    _, h, w = image.shape
    return out, torch.zeros(0, 4), FitInfo((1.0, 1.0), (h, w), (h, w), False)
