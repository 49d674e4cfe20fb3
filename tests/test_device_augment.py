"""The device augmentation against the host pipeline it replaces (data.augment_on=device).

1. Same draws, same crops: fed the same option indices and trial matrices round by round, the
   batched IoU crop picks exactly the crop `IoUCropSampler` picks (which tests/test_iou_crop.py
   replays against torchvision's own `RandomIoUCrop`).
2. Same parameters, same pixels and boxes: for a given zoom-out, crop, flip and fit, the
   device canvas equals the host's (`_crop`, `_hflip`, torchvision's `pad`, `fit_to_canvas`)
   to float rounding and the boxes are identical (`crop_boxes`, `hflip_boxes`, `sanitize`,
   torchvision's `resize_boxes`), for every fit mode.
3. The fit's content sizes equal the host's `content_size`.
4. Zoom-out parameters have `RandomZoomOut`'s distribution; rounds left undecided are rare.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssd_npu.choices import Canvas
from ssd_npu.data.device_augment import AugmentParams, DeviceAugment, DrawLayout
from ssd_npu.data.fit import _clip, content_size, fit_to_canvas
from ssd_npu.data.iou_crop import IoUCropSampler, crop_boxes, hflip_boxes, sanitize
from ssd_npu.data.transforms import _crop, _hflip

OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _random_boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    side = 4.0 * torch.exp(torch.rand(n, 2, generator=g) * torch.log(torch.tensor([w, h]) / 4.0))
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - side)
    return torch.cat([xy, xy + side], 1).to(torch.float32)


def _batch(g: torch.Generator, B: int, M: int, slot: tuple[int, int]):
    """Random images in slots, sizes, boxes padded to M with valid masks."""
    Hs, Ws = slot
    slots = torch.zeros(B, 3, Hs, Ws, dtype=torch.uint8)
    sizes = torch.zeros(B, 2, dtype=torch.int64)
    boxes = torch.zeros(B, M, 4)
    valid = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        h = int(torch.randint(20, Hs + 1, (1,), generator=g))
        w = int(torch.randint(20, Ws + 1, (1,), generator=g))
        slots[b, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        n = int(torch.randint(0, M + 1, (1,), generator=g))
        boxes[b, :n] = _random_boxes(g, n, h, w)
        valid[b, :n] = True
        sizes[b] = torch.tensor([h, w])
    return slots, sizes, boxes, valid


def _host_crop(draws: torch.Tensor, boxes: np.ndarray, size, lay: DrawLayout):
    """IoUCropSampler's round loop on the same draws: (top, left, h, w, keep) or None."""
    sampler = IoUCropSampler()
    h, w = size
    cx, cy = (
        np.float32(0.5) * (boxes[:, 0] + boxes[:, 2]),
        np.float32(0.5) * (boxes[:, 1] + boxes[:, 3]),
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    r_all = draws[lay.trials_start :].reshape(lay.rounds, lay.trials, 4).numpy()
    for k in range(lay.rounds):
        idx = min(int(draws[lay.OPTIONS + k] * len(OPTIONS)), len(OPTIONS) - 1)
        threshold = OPTIONS[idx]
        if threshold >= 1.0:
            return None
        found = sampler._round(r_all[k], threshold, h, w, boxes, cx, cy, area, 0.7)
        if found is not None:
            return found
    return None  # undecided: left as it is


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_iou_crop_picks_the_host_samplers_crop(seed):
    g = torch.Generator().manual_seed(seed)
    aug = DeviceAugment(Canvas(64, 64), recipe="ssdlite", rounds=4)
    lay = aug.layout
    slots, sizes, boxes, valid = _batch(g, 48, 6, (96, 128))
    draws = torch.rand(48, aug.draws, generator=g)
    # rarer leave-as-is options so that most images take a crop
    draws[:, lay.OPTIONS : lay.OPTIONS + lay.rounds] *= 6 / 7
    p = aug.params(sizes, boxes, valid, draws)
    crops = 0
    for b in range(48):
        n = int(valid[b].sum())
        h, w = sizes[b].tolist()
        got = (p.crop_top[b].item(), p.crop_left[b].item(), p.crop_h[b].item(), p.crop_w[b].item())
        want = _host_crop(draws[b], boxes[b, :n].numpy(), (h, w), lay) if n else None
        if want is None:
            assert got == (0, 0, h, w), b
            continue
        crops += 1
        assert got == (want.top, want.left, want.height, want.width), b
        assert p.keep[b, :n].tolist() == want.keep.tolist()
    assert crops > 20  # the comparison covered real crops


def _host_pipeline(image, boxes, crop, flip, zoom, canvas, fit, pad_value, fill):
    """The host's order: zoom-out (torchvision pad), crop, flip, sanitize, fit."""
    img = image
    b = boxes.numpy().copy()
    if zoom is not None:
        top, left, zh, zw = zoom
        h, w = img.shape[-2:]
        img = TF.pad(img, [left, top, zw - w - left, zh - h - top], fill=[int(v) for v in fill])
        b = b + np.array([left, top, left, top], np.float32)
    if crop is not None:
        top, left, ch, cw, keep = crop
        img = _crop(img, top, left, ch, cw)

        class P:  # the fields crop_boxes reads
            pass

        params = P()
        params.top, params.left, params.height, params.width, params.keep = top, left, ch, cw, keep
        b = crop_boxes(b, params)
    h, w = img.shape[-2:]
    if flip:
        img = _hflip(img)
        b = hflip_boxes(b, w)
    keep = sanitize(b, (h, w))
    out, out_boxes, _ = fit_to_canvas(img, torch.from_numpy(b), canvas, fit, pad_value)
    return out, out_boxes, keep


def _params(B, **fields) -> AugmentParams:
    z = torch.zeros(B, dtype=torch.int64)
    base = dict(zoom_h=z, zoom_w=z, zoom_top=z, zoom_left=z, crop_top=z, crop_left=z,
                crop_h=z, crop_w=z, flip=torch.zeros(B, dtype=torch.bool),
                undecided=torch.zeros(B, dtype=torch.bool))  # fmt: skip
    base.update(fields)
    return AugmentParams(**base)


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "pad"])
@pytest.mark.parametrize("zoomed", [False, True])
def test_pixels_and_boxes_equal_the_host_pipeline_for_given_parameters(fit, zoomed):
    g = torch.Generator().manual_seed(7)
    canvas = Canvas(64, 96)
    recipe = "ssd" if zoomed else "ssdlite"
    aug = DeviceAugment(canvas, fit=fit, pad_value=0.25, recipe=recipe)
    B, M = 12, 5
    slots, sizes, boxes, valid = _batch(g, B, M, (80, 120))
    valid[:, :2] = True  # at least two boxes each (drawn again where missing)
    for b in range(B):
        h, w = sizes[b].tolist()
        if not valid[b].any() or boxes[b, :2].abs().sum() == 0:
            boxes[b, :2] = _random_boxes(g, 2, h, w)
    fields = {k: [] for k in ("zoom_h", "zoom_w", "zoom_top", "zoom_left", "crop_top",
                              "crop_left", "crop_h", "crop_w", "flip")}  # fmt: skip
    keep = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        h, w = sizes[b].tolist()
        zh, zw, zt, zl = h, w, 0, 0
        if zoomed and b % 2 == 0:
            zh, zw = int(h * 1.7), int(w * 2.3)
            zt, zl = int((zh - h) * 0.3), int((zw - w) * 0.6)
        ch = int(torch.randint(1, zh + 1, (1,), generator=g))
        cw = int(torch.randint(1, zw + 1, (1,), generator=g))
        ct = int(torch.randint(0, zh - ch + 1, (1,), generator=g))
        cl = int(torch.randint(0, zw - cw + 1, (1,), generator=g))
        if b % 3 == 0:  # some images keep their whole frame
            ct, cl, ch, cw = 0, 0, zh, zw
        framed = boxes[b] + torch.tensor([zl, zt, zl, zt], dtype=torch.float32)
        cx, cy = 0.5 * (framed[:, 0] + framed[:, 2]), 0.5 * (framed[:, 1] + framed[:, 3])
        keep[b] = (cl < cx) & (cx < cl + cw) & (ct < cy) & (cy < ct + ch)
        for k, v in zip(fields, (zh, zw, zt, zl, ct, cl, ch, cw, b % 2 == 1), strict=True):
            fields[k].append(v)
    p = _params(B, **{k: torch.tensor(v) for k, v in fields.items()}, keep=keep)
    images, out_boxes, out_valid = aug.apply(slots, sizes, boxes, valid, p)
    fill = [round(v * 255) for v in aug.zoom_fill]
    for b in range(B):
        h, w = sizes[b].tolist()
        n = int(valid[b].sum())
        zoom = None
        if zoomed:
            zoom = (
                fields["zoom_top"][b],
                fields["zoom_left"][b],
                fields["zoom_h"][b],
                fields["zoom_w"][b],
            )
        crop = (fields["crop_top"][b], fields["crop_left"][b], fields["crop_h"][b],
                fields["crop_w"][b], keep[b, :n].numpy())  # fmt: skip
        want_img, want_boxes, want_keep = _host_pipeline(
            slots[b, :, :h, :w],
            boxes[b, :n],
            crop,
            fields["flip"][b],
            zoom,
            canvas,
            fit,
            0.25,
            fill,
        )
        torch.testing.assert_close(images[b], want_img, atol=1e-5, rtol=0)
        assert out_valid[b, :n].tolist() == want_keep.tolist()
        assert not out_valid[b, n:].any()
        assert torch.equal(out_boxes[b, :n][out_valid[b, :n]], want_boxes[want_keep]), b


def test_content_sizes_equal_the_host_fit():
    g = torch.Generator().manual_seed(3)
    h = torch.randint(1, 2000, (4000,), generator=g)
    w = torch.randint(1, 2000, (4000,), generator=g)
    for canvas in (Canvas(320, 320), Canvas(224, 384), Canvas(300, 300)):
        for fit in ("stretch", "letterbox", "pad"):
            ch, cw = DeviceAugment(canvas, fit=fit).content_size(h, w)
            want = [
                content_size(a, b, canvas, fit)[:2]
                for a, b in zip(h.tolist(), w.tolist(), strict=True)
            ]
            assert list(zip(ch.tolist(), cw.tolist(), strict=True)) == want, (canvas, fit)


def test_without_a_recipe_the_device_fit_is_the_host_fit():
    """augment=false: the fit alone, every image whole, boxes as `fit_to_canvas` gives."""
    g = torch.Generator().manual_seed(5)
    slots, sizes, boxes, valid = _batch(g, 6, 4, (72, 100))
    for fit in ("stretch", "letterbox", "pad"):
        aug = DeviceAugment(Canvas(64, 64), fit=fit, recipe="none")
        out = aug(slots, sizes, boxes, torch.ones_like(valid, dtype=torch.int64), valid,
                  torch.rand(6, aug.draws, generator=g))  # fmt: skip
        for b in range(6):
            h, w = sizes[b].tolist()
            n = int(valid[b].sum())
            img, bx, _ = fit_to_canvas(slots[b, :, :h, :w], boxes[b, :n], Canvas(64, 64), fit)
            torch.testing.assert_close(out.images[b], img, atol=1e-5, rtol=0)
            keep = sanitize(boxes[b, :n].numpy(), (h, w))
            assert torch.equal(out.boxes[b, :n][out.valid[b, :n]], _clip(bx, 64, 64)[keep])


def test_zoom_out_has_torchvisions_distribution():
    """RandomZoomOut(side_range=(1, 4), p=0.5): the applied share, the side ratio and the
    offsets' fractions, against torchvision's own draws (KS distance, fixed seeds)."""
    from torchvision.transforms import v2

    n = 4000
    h, w = 300, 400
    aug = DeviceAugment(Canvas(64, 64), recipe="ssd")
    g = torch.Generator().manual_seed(11)
    draws = torch.rand(n, aug.draws, generator=g)
    sizes = torch.tensor([[h, w]] * n)
    zh, zw, zt, zl = aug._zoom_out(sizes[:, 0], sizes[:, 1], draws)
    ours_applied = (zw != w) | (zh != h)
    torch.manual_seed(12)
    zoom = v2.RandomZoomOut(side_range=(1.0, 4.0), p=0.5)
    theirs = []
    image = torch.zeros(1, h, w)
    for _ in range(n):
        if torch.rand(1) >= zoom.p:  # _RandomApplyTransform's test
            theirs.append(None)
            continue
        params = zoom.make_params([image])
        left, top, right, bottom = params["padding"]
        theirs.append((left + w + right, top + h + bottom, left, top))
    applied = np.array([t is not None for t in theirs])
    assert abs(applied.mean() - ours_applied.float().mean().item()) < 0.04
    ratio_theirs = np.sort([t[0] / w for t in theirs if t is not None])
    ratio_ours = np.sort((zw[ours_applied].float() / w).numpy())
    grid = np.linspace(1, 4, 50)
    ks = np.abs(
        np.searchsorted(ratio_theirs, grid) / len(ratio_theirs)
        - np.searchsorted(ratio_ours, grid) / len(ratio_ours)
    ).max()
    assert ks < 0.06
    # offsets are a uniform fraction of the free space
    frac = (zl[ours_applied].float() / (zw[ours_applied] - w).clamp(min=1).float()).numpy()
    assert abs(frac.mean() - 0.5) < 0.03


def test_undecided_images_are_rare_with_sixteen_rounds():
    """Images whose 16 rounds all fail (left as they are, where torchvision would try
    again): measured on COCO-like boxes (1-8 boxes, sides 4 px to the whole image)."""
    g = torch.Generator().manual_seed(21)
    aug = DeviceAugment(Canvas(64, 64), recipe="ssdlite")
    slots, sizes, boxes, valid = _batch(g, 400, 8, (48, 64))
    valid[:, 0] = True
    boxes[:, 0] = torch.tensor([4.0, 4.0, 16.0, 16.0])
    p = aug.params(sizes, boxes, valid, torch.rand(400, aug.draws, generator=g))
    assert p.undecided.float().mean().item() < 0.01
