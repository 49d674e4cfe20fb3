"""torchvision's `RandomPhotometricDistort` on a batch of uint8 slots, on the device, with
static shapes: the first step of the ssd recipe in `ssd_npu.data.device_augment`.

Every adjustment is computed for every image and kept where its per-image flag says so
(`torch.where`), the channel permutation is a per-image gather, and each kernel is
torchvision's uint8 arithmetic op by op (`adjust_brightness`, `adjust_contrast`,
`adjust_saturation`, `adjust_hue`, `permute_channels`): float32, truncated back to uint8 as
they do, `_blend`'s `add_(alpha=)` as one fused multiply-add (`addcmul`, what its CPU kernel
does), the contrast's mean over the image's h x w only (the slot's margins do not count),
summed exactly in int32. Eager on the cpu the uint8 pixels are torchvision's exactly; a
compiler that fuses the float ops otherwise can move a pixel that lands within float
rounding of a grey level by one.

Its random numbers are a block of DRAWS uniforms in each image's draws row (the block's
place: `device_augment.DrawLayout.photo_start`): APPLY + 0..3 apply brightness, contrast,
saturation, hue when < p; FACTOR + 0..3 their factors, lo + u (hi - lo); BEFORE contrast
before saturation and hue when < 0.5; PERMUTE permute the channels when < p; PERMUTATION the
permutation, `PERMUTATIONS[floor(6 u)]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# The 6 channel permutations, in lexicographic order: one uniform u picks row floor(6 u)
# (`_permutation_index`); torchvision draws `torch.randperm(3)`, uniform over the same 6.
PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
# torchvision's float -> uint8 conversion (`to_dtype_image`): x * (255 + 1 - 1e-3), truncated
_TO_UINT8 = 255.0 + 1.0 - 1e-3

# offsets of the uniforms in an image's photometric block, and its length
APPLY = 0
FACTOR = 4
BEFORE = 8
PERMUTE = 9
PERMUTATION = 10
DRAWS = 11


@dataclass(frozen=True)
class PhotometricDistort:
    """torchvision `RandomPhotometricDistort`'s settings (its defaults): each factor uniform in
    its (lo, hi) range; p: the chance of each of the 4 adjustments and of the permutation."""

    brightness: tuple[float, float] = (0.875, 1.125)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.05, 0.05)
    p: float = 0.5

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)}: need 0 <= lo <= hi")
        if not -0.5 <= self.hue[0] <= self.hue[1] <= 0.5:
            raise ValueError(f"hue={self.hue}: need -0.5 <= lo <= hi <= 0.5")

    def params(self, u: Tensor) -> PhotoParams:
        """torchvision `RandomPhotometricDistort.make_params` for every image from its block
        of uniforms, u float32 [B, DRAWS] in [0, 1) (offsets: APPLY, FACTOR, BEFORE, PERMUTE,
        PERMUTATION): the same apply rates, factor ranges, order and permutations."""
        d = self
        ranges = (d.brightness, d.contrast, d.saturation, d.hue)
        lo = torch.tensor([r[0] for r in ranges], dtype=torch.float32, device=u.device)
        hi = torch.tensor([r[1] for r in ranges], dtype=torch.float32, device=u.device)
        # uniform_(lo, hi) as ColorJitter._generate_value; float32, as torchvision's draw
        factors = lo + u[:, FACTOR : FACTOR + 4] * (hi - lo)  # [B, 4]
        apply = u[:, APPLY : APPLY + 4] < d.p  # torch.rand(1) < p
        table = torch.tensor(PERMUTATIONS, dtype=torch.int64, device=u.device)
        return PhotoParams(
            *factors.unbind(1),
            *apply.unbind(1),
            contrast_before=u[:, BEFORE] < 0.5,
            do_permute=u[:, PERMUTE] < d.p,
            permutation=table[_permutation_index(u[:, PERMUTATION])],
        )


class PhotoParams(NamedTuple):
    """Per-image parameters of the photometric distortion, [B] each unless said. Factors are
    float32 (used where their flag is set); flags bool; permutation int64 [B, 3]: output
    channel c reads input channel permutation[:, c] (`permute_channels`' `image[:, perm]`)."""

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    do_brightness: Tensor
    do_contrast: Tensor
    do_saturation: Tensor
    do_hue: Tensor
    contrast_before: Tensor  # contrast before saturation and hue, else after them
    do_permute: Tensor
    permutation: Tensor  # [B, 3] int64


def distort(slots: Tensor, sizes: Tensor, q: PhotoParams) -> Tensor:
    """torchvision `RandomPhotometricDistort.transform` on every slot at once: slots uint8
    [B, 3, Hs, Ws] (image at the top left, sizes [B, 2] (h, w) px) -> uint8, the same
    shape and memory format. Its order: brightness, contrast (when before), saturation,
    hue, contrast (when after), channel permutation. Every adjustment runs on every image
    and `torch.where` keeps it where the image's flag is set (no branch on data); the
    contrast therefore runs at both places, each with its own masked mean (its input
    differs, and one mean at one place would need saturation and hue twice). Outside the
    h x w image the slot's values change too, unread: the resample gives them no weight.
    """
    _, _, Hs, Ws = slots.shape
    dev = slots.device
    h, w = sizes[:, 0].long(), sizes[:, 1].long()
    rows = torch.arange(Hs, device=dev)[None, :, None] < h[:, None, None]
    cols = torch.arange(Ws, device=dev)[None, None, :] < w[:, None, None]
    inside = rows & cols  # [B, Hs, Ws]: the image's pixels, which the contrast mean counts
    area = (h * w).to(torch.float32)
    before = q.do_contrast & q.contrast_before
    after = q.do_contrast & ~q.contrast_before
    x = _keep(q.do_brightness, _brightness(slots, q.brightness), slots)
    x = _keep(before, _contrast(x, q.contrast, inside, area), x)
    x = _keep(q.do_saturation, _saturation(x, q.saturation), x)
    x = _keep(q.do_hue, _hue(x, q.hue), x)
    x = _keep(after, _contrast(x, q.contrast, inside, area), x)
    return _keep(q.do_permute, _permute(x, q.permutation), x)


# -- photometric kernels: torchvision's uint8 arithmetic (transforms/v2/functional/_color.py),
# per image factors [B] float32, images uint8 [B, 3, Hs, Ws] -------------------------------


def _permutation_index(u: Tensor) -> Tensor:
    """Row of `PERMUTATIONS` [N] int64 for uniforms u [N] in [0, 1): floor(6 u). Over all
    2^24 float32 values torch.rand can give, each row gets 2^24 / 6 of them within one
    (tests/test_device_augment.py counts them): uniform over the 6, as `torch.randperm(3)`."""
    return (u * len(PERMUTATIONS)).long().clamp(max=len(PERMUTATIONS) - 1)


def _per_image(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast over an image batch."""
    return v[:, None, None, None]


def _keep(flag: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    """Per image: `changed` where flag [B] is set, else x."""
    return torch.where(_per_image(flag), changed, x)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    """`adjust_brightness_image`: x * factor in float32, clamped to [0, 255], truncated."""
    return (x.to(torch.float32) * _per_image(factor)).clamp(0, 255).to(torch.uint8)


def _grey(x: Tensor) -> Tensor:
    """`_rgb_to_grayscale_image(preserve_dtype=False)` then floor, as the uint8 kernels do:
    float32 [B, 1, Hs, Ws], whole grey levels. r * 0.2989, then g and b added by `add_(alpha=)`,
    i.e. fused multiply-adds."""
    r, g, b = x.to(torch.float32).unbind(1)
    grey = torch.add(torch.add(r * 0.2989, g, alpha=0.587), b, alpha=0.114)
    return grey.floor()[:, None]


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """`_blend(x, other, ratio)` on uint8 x: x * ratio + other * (1 - ratio), the second term
    fused in (`add_(other, alpha=1 - ratio)` is a fused multiply-add; addcmul is the one with
    a tensor factor), clamped to [0, 255], truncated. other broadcasts to x."""
    r = _per_image(ratio)
    mixed = torch.addcmul(x.to(torch.float32) * r, other, 1.0 - r)
    return mixed.clamp(0, 255).to(torch.uint8)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    """`adjust_saturation_image`: blend with the pixel's own floored grey."""
    return _blend(x, _grey(x), factor)


def _contrast(x: Tensor, factor: Tensor, inside: Tensor, area: Tensor) -> Tensor:
    """`adjust_contrast_image`: blend with the mean of the floored grey over the image's own
    pixels: inside bool [B, Hs, Ws], area [B] float32 (h w). The grey levels are whole, so
    their int32 sum is exact (torch.mean sums the same integers in float32: the same while
    the sum stays under 2^24, and torchvision's CPU mean is that sum / area)."""
    grey = _grey(x)[:, 0].to(torch.int32)
    total = torch.where(inside, grey, 0).sum((1, 2), dtype=torch.int32)
    mean = total.to(torch.float32) / area
    return _blend(x, _per_image(mean), factor)


def _hue(x: Tensor, factor: Tensor) -> Tensor:
    """`adjust_hue_image`: to float32 [0, 1] (x * (1 / 255)), to HSV, hue + factor mod 1,
    back to RGB, to uint8 (x * 255.999, truncated); torchvision's ops in its order."""
    h, s, v = _rgb_to_hsv(x.to(torch.float32) * (1.0 / 255))
    h = (h + factor[:, None, None]).remainder(1.0)
    rgb = _hsv_to_rgb(h, s, v)  # [B, Hs, Ws, 3]
    # stacked last: the permuted view is channels-last, as the slots
    return (rgb * _TO_UINT8).to(torch.uint8).permute(0, 3, 1, 2)


def _rgb_to_hsv(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision `_rgb_to_hsv` on [B, 3, Hs, Ws] float32 in [0, 1]: (h, s, v) [B, Hs, Ws],
    h in [0, 1). Its ops and order (the masks multiply, as in torchvision)."""
    r, g, _ = image.unbind(1)
    maxc, minc = image.amax(1), image.amin(1)
    eqc = maxc == minc  # grey pixels: no hue, no saturation (denominators set to 1)
    ones = torch.ones_like(maxc)
    s = (maxc - minc) / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, maxc - minc)[:, None]
    rc, gc, bc = ((maxc[:, None] - image) / divisor).unbind(1)
    not_r = maxc != r
    is_g = maxc == g
    hg = (rc + 2.0 - bc) * (is_g & not_r)
    hr = (bc - gc) * ~not_r
    hb = (gc + 4.0 - rc) * (not_r & ~is_g)
    h = ((hr + hg + hb) * (1.0 / 6.0) + 1.0).fmod(1.0)
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """torchvision `_hsv_to_rgb`: (h, s, v) [B, Hs, Ws] -> rgb float32 [B, Hs, Ws, 3]. Its
    sector table (which of v, p, q, t each channel takes) as selections, not a gather."""
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    sector = i.to(torch.int32).remainder(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = ((1.0 - sxf) * v).clamp(0.0, 1.0)
    t = ((sxf + one_minus_s) * v).clamp(0.0, 1.0)
    p = (one_minus_s * v).clamp(0.0, 1.0)

    def pick(*by_sector: Tensor) -> Tensor:  # the value for sectors 0..5
        out = by_sector[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, by_sector[k], out)
        return out

    return torch.stack(
        (pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)), dim=-1
    )


def _permute(x: Tensor, permutation: Tensor) -> Tensor:
    """`permute_channels_image` per image: out[:, c] = x[:, permutation[:, c]], permutation
    [B, 3] int64; gathered along the last dim of the channels-last view, so the result stays
    channels-last."""
    B, C, Hs, Ws = x.shape
    pixels = x.permute(0, 2, 3, 1)  # [B, Hs, Ws, 3]
    index = permutation[:, None, None, :].expand(B, Hs, Ws, C)
    return pixels.gather(3, index).permute(0, 3, 1, 2)
