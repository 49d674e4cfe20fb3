"""Training augmentation and the fit to the canvas on the device: one batched resample, static
shapes, torch ops only (`data.augment_on=device`).

The host only decodes each image into a fixed-size uint8 slot (`ssd_npu.data.slots`); this
module turns a batch of slots into the canvas batch the network trains on, inside the compiled
step. The ssd recipe first distorts the colours of the uint8 slots (torchvision's
`RandomPhotometricDistort`: `ssd_npu.data.photometric`). Then zoom-out, IoU crop, horizontal flip and the fit (stretch | letterbox | pad) are each an
axis-aligned affine map, so their composition is one map per image: every canvas pixel reads
two rows and two columns of its slot (bilinear), and every box goes through the same map. No
shape depends on the data: the IoU crop tests all trials of all rounds at once (`rounds` x
`trials` candidates per image) and takes the first that passes, as torchvision's loop would.

Arithmetic is the host pipeline's (`ssd_npu.data.transforms`, `ssd_npu.data.fit`), so for
the same parameters the pixels agree to float rounding and the boxes exactly:
- Photometric distortion: torchvision's uint8 kernels op by op (`ssd_npu.data.photometric`).
- IoU crop: torchvision `RandomIoUCrop`'s tests in float32 with its truncations to int; its
  float64 aspect-ratio test is done exactly in integers (new_w * q >= p * new_h).
- Zoom-out: torchvision `RandomZoomOut`'s integer canvas and offsets; the fill is mixed into
  the bilinear weights where a sample falls outside the image.
- Resample: `F.interpolate(mode="bilinear", align_corners=False, antialias=False)` of the
  crop to the content size: source (i + 0.5) * in / out - 0.5, clamped at 0 and at the
  crop's last pixel (not the slot's), so the far edge never reads the neighbouring pixels.
- Fit sizes: `ssd_npu.data.fit.content_size`, with round-half-even on the exact ratio.

Randomness arrives as `draws`, float32 uniforms in [0, 1) per image drawn on the host from the
sample's own seed (seed, image id, epoch): the same seed gives the same run on any worker
count and any device, resume is exact, and nothing is drawn in the compiled graph. Their
layout (`DrawLayout`, the same for every recipe): flip, zoom (apply, ratio, x, y), one option
per round, rounds x trials x 4 (scale w, scale h, position x, position y), then the
photometric block (last, so the blocks before it kept their offsets and, the host's
`torch.rand(K)` being a prefix of a longer draw, their values). An image for which none of the
`rounds` rounds decides (each round: a leave-as-is option, or a trial that passes) is left
as it is: `AugmentOut.undecided` counts them (tests/test_device_augment.py measures how rare).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from ssd_npu.choices import FITS, Canvas
from ssd_npu.data import photometric
from ssd_npu.data.iou_crop import IoUCropSampler
from ssd_npu.data.photometric import PhotometricDistort, PhotoParams, distort
from ssd_npu.data.transforms import RECIPES as HOST_RECIPES
from ssd_npu.data.transforms import SSD_MEAN

# the host's recipes (torchvision references/detection presets), and "none" (augment=false)
RECIPES = ("none", *HOST_RECIPES)
# torchvision's ssd recipe: RandomZoomOut(fill=mean), the mean in uint8 levels -> [0, 1]
SSD_ZOOM_FILL = tuple(v / 255.0 for v in SSD_MEAN)


@dataclass(frozen=True)
class DrawLayout:
    """Where each random number sits in a row of `draws` [B, K].

    [FLIP] [ZOOM x 4] [OPTIONS x rounds] [trials: rounds x trials x 4] [photometric x 11];
    the photometric block's own layout: `ssd_npu.data.photometric`.
    """

    rounds: int
    trials: int

    FLIP = 0  # flip when < flip_p
    ZOOM = 1  # 4 values: apply when < p, side ratio, x offset, y offset
    OPTIONS = 5  # one per round: the minimum-IoU option index, floor(u * options)
    PHOTO_SIZE = photometric.DRAWS  # the photometric block's uniforms

    @property
    def trials_start(self) -> int:
        return self.OPTIONS + self.rounds

    @property
    def photo_start(self) -> int:
        """The photometric block, after the trials (also where the trials end)."""
        return self.trials_start + self.rounds * self.trials * 4

    @property
    def size(self) -> int:
        """K: uniforms per image."""
        return self.photo_start + self.PHOTO_SIZE


class AugmentParams(NamedTuple):
    """Per-image parameters of the composed map, all [B] int64 unless said (pixels).

    The image (h, w) sits inside a zoomed-out frame (zoom_h, zoom_w) at (zoom_top, zoom_left)
    (no zoom-out: the frame is the image); the crop takes rows crop_top..+crop_h and columns
    crop_left..+crop_w of that frame and is mirrored when `flip`; `keep` [B, M] bool marks the
    boxes whose centre lies strictly inside the crop (all True without a crop). `photo`: the
    colour distortion applied to the image first (None: none).
    """

    zoom_h: Tensor
    zoom_w: Tensor
    zoom_top: Tensor
    zoom_left: Tensor
    crop_top: Tensor
    crop_left: Tensor
    crop_h: Tensor
    crop_w: Tensor
    keep: Tensor  # [B, M] bool
    flip: Tensor  # [B] bool
    undecided: Tensor  # [B] bool: no round decided, left as it is
    photo: PhotoParams | None = None


class AugmentOut(NamedTuple):
    """The canvas batch: images float32 [B, 3, H, W] in [0, 1]; boxes float32 [B, M, 4] xyxy
    canvas px (zeros on invalid rows); labels int64 [B, M]; valid bool [B, M]; undecided:
    int64 scalar tensor, images whose IoU crop was left as it is for lack of rounds; removed:
    int64 scalar tensor, valid boxes the crop or the sanitising dropped (the host path drops
    them too, in `sanitize`)."""

    images: Tensor
    boxes: Tensor
    labels: Tensor
    valid: Tensor
    undecided: Tensor
    removed: Tensor


def _ratio(value: float, name: str) -> tuple[int, int]:
    """value as an exact small fraction p / q, for the exact integer aspect-ratio test."""
    frac = Fraction(value)
    if frac.denominator > 1024:
        raise ValueError(f"{name}={value}: the device IoU crop needs a ratio like 0.5 or 2.0")
    return frac.numerator, frac.denominator


def _round_half_even(num: Tensor, den: Tensor) -> Tensor:
    """round(num / den) for non-negative integer tensors, ties to even (Python's round)."""
    q = torch.div(num, den, rounding_mode="floor")
    twice_rem = 2 * (num - q * den)
    up = (twice_rem > den) | ((twice_rem == den) & (q % 2 == 1))
    return q + up.to(q.dtype)


@dataclass(frozen=True)
class DeviceAugment:
    """The training recipe and the fit of one run, applied to a batch of slots on the device.

    canvas (H, W); fit stretch | letterbox | pad; pad_value in [0, 1]; recipe (RECIPES):
    "none" (fit only, augment=false), "hflip" (RetinaNet / FCOS), "ssdlite" (IoU crop +
    flip), "ssd" (photometric distortion + zoom-out + IoU crop + flip).
    `rounds`: IoU-crop rounds tested per image (torchvision loops until one decides).
    """

    canvas: Canvas
    fit: str = "stretch"
    pad_value: float = 0.0
    recipe: str = "ssdlite"
    crop: IoUCropSampler = field(default_factory=IoUCropSampler)
    rounds: int = 16
    flip_p: float = 0.5
    zoom_p: float = 0.5
    zoom_side: tuple[float, float] = (1.0, 4.0)
    zoom_fill: tuple[float, float, float] = SSD_ZOOM_FILL
    photo: PhotometricDistort = field(default_factory=PhotometricDistort)

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit={self.fit!r} is not valid; choose one of: {', '.join(FITS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}: choose one of {', '.join(RECIPES)}")
        _ratio(self.crop.min_aspect_ratio, "min_aspect_ratio")
        _ratio(self.crop.max_aspect_ratio, "max_aspect_ratio")

    @property
    def layout(self) -> DrawLayout:
        return DrawLayout(self.rounds, self.crop.trials)

    @property
    def draws(self) -> int:
        """K: the uniforms each sample brings (`SlotSample(draws=...)`)."""
        return self.layout.size

    def __call__(
        self,
        slots: Tensor,
        sizes: Tensor,
        boxes: Tensor,
        labels: Tensor,
        valid: Tensor,
        draws: Tensor,
    ) -> AugmentOut:
        """slots uint8 [B, 3, Hs, Ws] (image at the top left); sizes [B, 2] (h, w) px; boxes
        float32 [B, M, 4] xyxy image px; labels [B, M]; valid bool [B, M]; draws float32
        [B, K] in [0, 1). Returns the canvas batch (`AugmentOut`)."""
        params = self.params(sizes, boxes, valid, draws)
        images, out_boxes, out_valid = self.apply(slots, sizes, boxes, valid, params)
        labels = torch.where(out_valid, labels, torch.zeros_like(labels))
        removed = (valid & ~out_valid).sum()
        return AugmentOut(images, out_boxes, labels, out_valid, params.undecided.sum(), removed)

    # -- parameters -------------------------------------------------------------------------

    def params(self, sizes: Tensor, boxes: Tensor, valid: Tensor, draws: Tensor) -> AugmentParams:
        """Draw the recipe's parameters for every image from its uniforms (static shapes)."""
        h, w = sizes[:, 0].long(), sizes[:, 1].long()
        zero = torch.zeros_like(h)
        zoom_h, zoom_w, zoom_top, zoom_left = h, w, zero, zero
        if self.recipe == "ssd":
            zoom_h, zoom_w, zoom_top, zoom_left = self._zoom_out(h, w, draws)
        shift = torch.stack([zoom_left, zoom_top, zoom_left, zoom_top], -1).to(boxes.dtype)
        framed = boxes + shift[:, None, :]  # boxes in the zoomed frame (v2's pad of boxes)
        full = torch.ones_like(valid)
        crop = (zero, zero, zoom_h, zoom_w, full, torch.zeros_like(valid[:, 0]))
        if self.recipe in ("ssdlite", "ssd"):
            crop = self._iou_crop(zoom_h, zoom_w, framed, valid, draws)
        flip = torch.zeros_like(valid[:, 0])
        if self.recipe != "none":
            flip = draws[:, DrawLayout.FLIP] < self.flip_p  # v2: flip when rand(1) < p
        photo = None
        if self.recipe == "ssd":
            lay = self.layout
            photo = self.photo.params(draws[:, lay.photo_start : lay.photo_start + lay.PHOTO_SIZE])
        top, left, crop_h, crop_w, keep, undecided = crop
        return AugmentParams(
            zoom_h,
            zoom_w,
            zoom_top,
            zoom_left,
            top,
            left,
            crop_h,
            crop_w,
            keep,
            flip,
            undecided,
            photo,
        )

    def _zoom_out(self, h: Tensor, w: Tensor, draws: Tensor) -> tuple[Tensor, ...]:
        """torchvision `RandomZoomOut._get_params`: a canvas ratio x the image, the image at a
        random integer offset; applied when rand(1) < p (else the frame is the image)."""
        u = draws[:, DrawLayout.ZOOM : DrawLayout.ZOOM + 4]
        lo, hi = (torch.tensor(v, dtype=torch.float32, device=u.device) for v in self.zoom_side)
        ratio = lo + u[:, 1] * (hi - lo)
        canvas_w = (w.float() * ratio).long()
        canvas_h = (h.float() * ratio).long()
        left = ((canvas_w - w).float() * u[:, 2]).long()
        top = ((canvas_h - h).float() * u[:, 3]).long()
        apply = u[:, 0] < self.zoom_p
        zero = torch.zeros_like(h)
        return (
            torch.where(apply, canvas_h, h),
            torch.where(apply, canvas_w, w),
            torch.where(apply, top, zero),
            torch.where(apply, left, zero),
        )

    def _iou_crop(
        self, h: Tensor, w: Tensor, boxes: Tensor, valid: Tensor, draws: Tensor
    ) -> tuple[Tensor, ...]:
        """All rounds x trials of `RandomIoUCrop` at once; per image the first round that
        decides (leave-as-is option, or a passing trial) and its first passing trial.

        h, w [B] frame size; boxes [B, M, 4] xyxy frame px; valid [B, M]. Returns crop top,
        left, height, width [B], keep [B, M] (box centres strictly inside), undecided [B].
        """
        c, lay = self.crop, self.layout
        B, R, T = h.shape[0], lay.rounds, lay.trials
        dev, f32 = draws.device, torch.float32
        options = torch.tensor(c.sampler_options, dtype=f32, device=dev)
        n_opt = len(c.sampler_options)
        u_opt = draws[:, lay.OPTIONS : lay.OPTIONS + R]
        threshold = options[(u_opt * n_opt).long().clamp(max=n_opt - 1)]  # [B, R]
        r = draws[:, lay.trials_start : lay.photo_start].reshape(B, R, T, 4)
        # float32 products truncated to int, as `int(orig_w * r[0])` on a float32 tensor
        min_scale = torch.tensor(c.min_scale, dtype=f32, device=dev)
        span = torch.tensor(c.max_scale - c.min_scale, dtype=f32, device=dev)
        scale = min_scale + span * r[..., :2]
        wf, hf = w.to(f32)[:, None, None], h.to(f32)[:, None, None]
        new_w = (wf * scale[..., 0]).long()  # [B, R, T]
        new_h = (hf * scale[..., 1]).long()
        p_lo, q_lo = _ratio(c.min_aspect_ratio, "min_aspect_ratio")
        p_hi, q_hi = _ratio(c.max_aspect_ratio, "max_aspect_ratio")
        # new_w / new_h in [lo, hi], exactly (torchvision divides in float64)
        ok = (new_w * q_lo >= p_lo * new_h) & (new_w * q_hi <= p_hi * new_h)
        ok &= (new_w > 0) & (new_h > 0)
        left = ((w[:, None, None] - new_w).to(f32) * r[..., 2]).long()
        top = ((h[:, None, None] - new_h).to(f32) * r[..., 3]).long()
        lf, tf = left.to(f32)[..., None], top.to(f32)[..., None]  # [B, R, T, 1]
        rf, bf = (left + new_w).to(f32)[..., None], (top + new_h).to(f32)[..., None]
        b = boxes[:, None, None]  # [B, 1, 1, M, 4]
        x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
        half = torch.tensor(0.5, dtype=f32, device=dev)
        cx, cy = half * (x1 + x2), half * (y1 + y2)
        inside = (lf < cx) & (cx < rf) & (tf < cy) & (cy < bf) & valid[:, None, None, :]
        ok &= inside.any(-1)
        inter = (torch.minimum(x2, rf) - torch.maximum(x1, lf)).clamp(min=0) * (
            torch.minimum(y2, bf) - torch.maximum(y1, tf)
        ).clamp(min=0)
        iou = inter / ((x2 - x1) * (y2 - y1) + (rf - lf) * (bf - tf) - inter)
        best = torch.where(inside, iou, torch.full_like(iou, -1.0)).amax(-1)
        ok &= ~(best < threshold[..., None])  # torchvision: `if ious.max() < t: continue`

        leave = threshold >= 1.0  # [B, R]: the leave-as-is option ends the loop
        decided = leave | ok.any(-1)
        k = _first(decided)  # [B]: the first round that decides (R when none does)
        k_safe = k.clamp(max=R - 1)
        t = _first(ok.gather(1, k_safe[:, None, None].expand(B, 1, T))[:, 0])  # [B]
        flat = k_safe * T + t.clamp(max=T - 1)  # [B] into R x T

        def pick(x: Tensor) -> Tensor:
            return x.reshape(B, R * T).gather(1, flat[:, None])[:, 0]

        leave_k = leave.gather(1, k_safe[:, None])[:, 0]
        crop = (k < R) & ~leave_k
        M = boxes.shape[1]
        keep = inside.reshape(B, R * T, M).gather(1, flat[:, None, None].expand(B, 1, M))
        zero = torch.zeros_like(h)
        return (
            torch.where(crop, pick(top), zero),
            torch.where(crop, pick(left), zero),
            torch.where(crop, pick(new_h), h),
            torch.where(crop, pick(new_w), w),
            torch.where(crop[:, None], keep[:, 0], torch.ones_like(valid)),
            k >= R,
        )

    # -- the map ----------------------------------------------------------------------------

    def content_size(self, h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """`ssd_npu.data.fit.content_size` for [B] int tensors: (ch, cw) inside the canvas."""
        H, W = self.canvas
        if self.fit == "stretch":
            return torch.full_like(h, H), torch.full_like(w, W)
        # s = min(H / h, W / w): the height limits when H * w <= W * h
        by_height = H * w <= W * h
        ch = torch.where(by_height, torch.full_like(h, H), _round_half_even(h * W, w))
        cw = torch.where(by_height, _round_half_even(w * H, h), torch.full_like(w, W))
        ch, cw = ch.clamp(1, H), cw.clamp(1, W)
        if self.fit == "pad":  # no resize when the image fits
            fits = (h <= H) & (w <= W)
            ch, cw = torch.where(fits, h, ch), torch.where(fits, w, cw)
        return ch, cw

    def apply(
        self, slots: Tensor, sizes: Tensor, boxes: Tensor, valid: Tensor, p: AugmentParams
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The photometric distortion (when `p.photo`), then the composed map: (images float32
        [B, 3, H, W] in [0, 1], boxes [B, M, 4] canvas px, valid [B, M]) for the given
        parameters."""
        if p.photo is not None:  # on the uint8 pixels, before the zoom-out, as torchvision
            slots = distort(slots, sizes, p.photo)
        ch, cw = self.content_size(p.crop_h, p.crop_w)
        images = self._resample(slots, sizes, p, ch, cw)
        out_boxes, out_valid = self._boxes(boxes, valid, p, ch, cw)
        return images, out_boxes, out_valid

    def _boxes(
        self, boxes: Tensor, valid: Tensor, p: AugmentParams, ch: Tensor, cw: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Zoom shift, crop (shift, clamp, centre test), flip, sanitise (torchvision's min
        size 1 px, in crop px), then the fit's scale and clip to the content; float32 as on
        the host (`crop_boxes`, `hflip_boxes`, `sanitize`, `resize_boxes`)."""
        f32 = boxes.dtype
        zx = p.zoom_left.to(f32)[:, None]
        zy = p.zoom_top.to(f32)[:, None]
        lx, ty = p.crop_left.to(f32)[:, None], p.crop_top.to(f32)[:, None]
        # host order: + zoom offset (v2 pad), then - crop offset (crop_boxes)
        x1, y1 = boxes[..., 0] + zx - lx, boxes[..., 1] + zy - ty
        x2, y2 = boxes[..., 2] + zx - lx, boxes[..., 3] + zy - ty
        wf, hf = p.crop_w.to(f32)[:, None], p.crop_h.to(f32)[:, None]
        x1, x2 = x1.clamp(min=0).minimum(wf), x2.clamp(min=0).minimum(wf)
        y1, y2 = y1.clamp(min=0).minimum(hf), y2.clamp(min=0).minimum(hf)
        zero = torch.zeros_like(x1)
        x1, y1, x2, y2 = (torch.where(p.keep, v, zero) for v in (x1, y1, x2, y2))
        flip = p.flip[:, None]
        x1, x2 = torch.where(flip, -(x2 - wf), x1), torch.where(flip, -(x1 - wf), x2)
        bw, bh = x2 - x1, y2 - y1
        ok = valid & (bw >= 1) & (bh >= 1) & (bw * bh >= 1)
        ok &= (x1 >= 0) & (y1 >= 0) & (x2 >= 0) & (y2 >= 0)
        ok &= (x1 <= wf) & (x2 <= wf) & (y1 <= hf) & (y2 <= hf)
        # torchvision resize_boxes: float32 ratios new / old
        sx = cw.to(f32)[:, None] / wf
        sy = ch.to(f32)[:, None] / hf
        cwf, chf = cw.to(f32)[:, None], ch.to(f32)[:, None]
        out = torch.stack(
            [
                (x1 * sx).clamp(min=0).minimum(cwf),
                (y1 * sy).clamp(min=0).minimum(chf),
                (x2 * sx).clamp(min=0).minimum(cwf),
                (y2 * sy).clamp(min=0).minimum(chf),
            ],
            -1,
        )
        return torch.where(ok[..., None], out, torch.zeros_like(out)), ok

    def _axis(
        self, out_len: int, content: Tensor, crop_len: Tensor, crop_off: Tensor,
        zoom_off: Tensor, size: Tensor, mirror: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """One axis of the bilinear map, for every output index 0..out_len-1 of every image.

        Returns the two source indices into the slot [B, L] (clamped into it), their weights
        [B, L] (zero where the source lies outside the image: the zoom-out fill), and the
        content mask [B, L] (False in the letterbox / pad margin)."""
        dev, f32 = content.device, torch.float32
        j = torch.arange(out_len, device=dev, dtype=f32)[None]  # [1, L]
        scale = crop_len.to(f32)[:, None] / content.to(f32)[:, None]  # interpolate's in / out
        src = (scale * (j + 0.5) - 0.5).clamp(min=0)
        i0 = src.long()  # floor (src >= 0)
        last = (crop_len - 1)[:, None]
        i1 = i0 + (i0 < last).long()
        w1 = src - i0.to(f32)
        w0 = 1.0 - w1
        if mirror is not None:  # the flipped crop's index j reads the crop's index len-1-j
            m = mirror[:, None]
            i0, i1 = torch.where(m, last - i0, i0), torch.where(m, last - i1, i1)
        # crop frame -> zoomed frame -> image
        i0 = i0 + (crop_off - zoom_off)[:, None]
        i1 = i1 + (crop_off - zoom_off)[:, None]
        lim = size[:, None]
        w0 = torch.where((i0 >= 0) & (i0 < lim), w0, torch.zeros_like(w0))
        w1 = torch.where((i1 >= 0) & (i1 < lim), w1, torch.zeros_like(w1))
        in_content = j < content.to(f32)[:, None]
        return i0, i1, w0, w1, in_content

    def _resample(
        self, slots: Tensor, sizes: Tensor, p: AugmentParams, ch: Tensor, cw: Tensor
    ) -> Tensor:
        """Every canvas pixel from two slot rows and two slot columns (separable bilinear)."""
        B, C, Hs, Ws = slots.shape
        H, W = self.canvas
        h, w = sizes[:, 0].long(), sizes[:, 1].long()
        y0, y1, wy0, wy1, in_y = self._axis(H, ch, p.crop_h, p.crop_top, p.zoom_top, h, None)
        x0, x1, wx0, wx1, in_x = self._axis(W, cw, p.crop_w, p.crop_left, p.zoom_left, w, p.flip)
        y0, y1 = y0.clamp(0, Hs - 1), y1.clamp(0, Hs - 1)
        x0, x1 = x0.clamp(0, Ws - 1), x1.clamp(0, Ws - 1)
        inv = 1.0 / 255  # to_dtype's arithmetic: x.to(float32) * (1 / 255)
        rows0 = slots.gather(2, y0[:, None, :, None].expand(B, C, H, Ws)).to(torch.float32) * inv
        rows1 = slots.gather(2, y1[:, None, :, None].expand(B, C, H, Ws)).to(torch.float32) * inv
        rows = rows0 * wy0[:, None, :, None] + rows1 * wy1[:, None, :, None]  # [B, C, H, Ws]
        cols0 = rows.gather(3, x0[:, None, None, :].expand(B, C, H, W))
        cols1 = rows.gather(3, x1[:, None, None, :].expand(B, C, H, W))
        image = cols0 * wx0[:, None, None, :] + cols1 * wx1[:, None, None, :]
        if self.recipe == "ssd":  # the zoom-out fill where samples fall outside the image
            fill = torch.tensor(self.zoom_fill, dtype=torch.float32, device=slots.device)
            inside = (wy0 + wy1)[:, None, :, None] * (wx0 + wx1)[:, None, None, :]
            image = image + fill[None, :, None, None] * (1.0 - inside)
        content = in_y[:, None, :, None] & in_x[:, None, None, :]
        return torch.where(content, image, torch.full_like(image, self.pad_value))


def _first(mask: Tensor) -> Tensor:
    """Index of the first True along the last dim of `mask` [..., N]; N where there is none
    (static: no nonzero, and the same answer on every backend, unlike argmax's tie rules)."""
    n = mask.shape[-1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, n)).amin(-1)
