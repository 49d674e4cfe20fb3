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
5. The ssd recipe's photometric distortion: for given parameters the uint8 slots equal
   torchvision's `RandomPhotometricDistort.transform` of each image exactly; its draws have
   `make_params`' distribution; the whole recipe (distortion, zoom-out, crop, flip, fit)
   equals the host pipeline (2.); it runs without host syncs or data-dependent shapes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssd_npu.choices import Canvas
from ssd_npu.data import photometric
from ssd_npu.data.device_augment import AugmentParams, DeviceAugment, DrawLayout
from ssd_npu.data.fit import _clip, content_size, fit_to_canvas
from ssd_npu.data.iou_crop import IoUCropSampler, crop_boxes, hflip_boxes, sanitize
from ssd_npu.data.photometric import (
    PERMUTATIONS,
    PhotometricDistort,
    PhotoParams,
    _permutation_index,
    distort,
)
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
    r_all = draws[lay.trials_start : lay.photo_start].reshape(lay.rounds, lay.trials, 4).numpy()
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


def _host_pipeline(image, boxes, crop, flip, zoom, canvas, fit, pad_value, fill, photo=None):
    """The host's order: photometric distortion (torchvision's own, `photo`: its params dict),
    zoom-out (torchvision pad), crop, flip, sanitize, fit."""
    img = image
    if photo is not None:
        img = v2.RandomPhotometricDistort().transform(tv_tensors.Image(img), photo)
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
@pytest.mark.parametrize(("zoomed", "distorted"), [(False, False), (True, False), (True, True)])
def test_pixels_and_boxes_equal_the_host_pipeline_for_given_parameters(fit, zoomed, distorted):
    """distorted: the whole ssd recipe, the photometric distortion first (on the slot, whose
    margins must not reach the canvas nor the contrast's mean)."""
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
    photo = _photo_params(g, B) if distorted else None
    p = _params(B, **{k: torch.tensor(v) for k, v in fields.items()}, keep=keep, photo=photo)
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
            _tv_params(photo, b) if distorted else None,
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


# -- the ssd recipe's photometric distortion ------------------------------------------------


def _photo_params(g: torch.Generator, B: int) -> PhotoParams:
    """Per-image parameters in torchvision's default ranges, each flag set for about half the
    images and every permutation present; factors at the ends of their ranges included."""
    u = torch.rand(B, 4, generator=g)
    lo = torch.tensor([0.875, 0.5, 0.5, -0.05])
    factors = lo + u * torch.tensor([0.25, 1.0, 1.0, 0.1])
    factors[0], factors[1] = lo, lo + torch.tensor([0.25, 1.0, 1.0, 0.1]) * (1 - 2**-24)
    flags = torch.rand(B, 6, generator=g) < 0.5
    return PhotoParams(
        *factors.unbind(1),
        *flags.unbind(1),
        permutation=torch.tensor(PERMUTATIONS)[torch.arange(B) % len(PERMUTATIONS)],
    )


def _tv_params(q: PhotoParams, b: int) -> dict:
    """Image b's parameters as `RandomPhotometricDistort.make_params` returns them."""

    def factor(value: torch.Tensor, flag: torch.Tensor) -> float | None:
        return float(value[b]) if bool(flag[b]) else None

    return {
        "brightness_factor": factor(q.brightness, q.do_brightness),
        "contrast_factor": factor(q.contrast, q.do_contrast),
        "saturation_factor": factor(q.saturation, q.do_saturation),
        "hue_factor": factor(q.hue, q.do_hue),
        "contrast_before": bool(q.contrast_before[b]),
        "channel_permutation": q.permutation[b] if bool(q.do_permute[b]) else None,
    }


def _colour_batch(g: torch.Generator, B: int, slot: tuple[int, int]):
    """Slots (channels-last, as collate_slots gives them) of random images, every fourth grey
    (r = g = b: hue and saturation's equal-channel cases, blends of a pixel with itself) and
    every fourth with two equal channels; the margins hold noise, which must not count."""
    Hs, Ws = slot
    slots = torch.randint(0, 256, (B, 3, Hs, Ws), generator=g, dtype=torch.uint8)
    sizes = torch.zeros(B, 2, dtype=torch.int64)
    for b in range(B):
        h = int(torch.randint(1, Hs + 1, (1,), generator=g))
        w = int(torch.randint(1, Ws + 1, (1,), generator=g))
        if b % 4 == 1:
            slots[b, :, :h, :w] = slots[b, :1, :h, :w].clone()
        elif b % 4 == 2:
            slots[b, 1, :h, :w] = slots[b, 0, :h, :w]
        sizes[b] = torch.tensor([h, w])
    return slots.contiguous(memory_format=torch.channels_last), sizes


@pytest.mark.parametrize("all_on", [False, True])
def test_photometric_distortion_equals_torchvisions_for_given_parameters(all_on):
    """Each image's h x w region of the distorted slot equals torchvision's own
    `RandomPhotometricDistort.transform` (its functional ops in its order) of that image,
    uint8 for uint8, hue included: the device repeats torchvision's float32 ops one by one
    (eager on the cpu, the same kernels round the same way). all_on: every adjustment on
    every image (hue and contrast at both places exercised on all pixels)."""
    g = torch.Generator().manual_seed(41 + all_on)
    B = 48
    slots, sizes = _colour_batch(g, B, (40, 56))
    q = _photo_params(g, B)
    if all_on:
        on = torch.ones(B, dtype=torch.bool)
        q = q._replace(do_brightness=on, do_contrast=on, do_saturation=on, do_hue=on)
        q = q._replace(do_permute=on)
    out = distort(slots, sizes, q)
    assert out.dtype == torch.uint8 and out.shape == slots.shape
    assert out.is_contiguous(memory_format=torch.channels_last)  # as the resample reads it
    transform = v2.RandomPhotometricDistort()
    changed = 0
    for b in range(B):
        h, w = sizes[b].tolist()
        image = slots[b, :, :h, :w]
        want = transform.transform(tv_tensors.Image(image), _tv_params(q, b))
        assert torch.equal(out[b, :, :h, :w], want.as_subclass(torch.Tensor)), b
        changed += not torch.equal(want, image)
    assert changed > B // 2  # the comparison covered real distortions
    for flag in (q.do_brightness, q.do_contrast, q.do_saturation, q.do_hue, q.do_permute):
        assert flag.any()
    assert (q.do_contrast & q.contrast_before).any() and (q.do_contrast & ~q.contrast_before).any()


def test_photometric_draws_have_torchvisions_distribution():
    """The parameters drawn from each image's uniforms against torchvision's own
    `RandomPhotometricDistort().make_params` (fixed seeds, 4000 each): apply rates, factor
    ranges, means and distributions (KS distance), contrast_before rate, permutation rate and
    frequencies; and the permutation pick is uniform over the 6 over every float32 uniform."""
    n = 4000
    aug = DeviceAugment(Canvas(64, 64), recipe="ssd")
    lay = aug.layout
    draws = torch.zeros(n, aug.draws)
    draws[:, lay.photo_start :] = torch.rand(
        n, lay.PHOTO_SIZE, generator=torch.Generator().manual_seed(51)
    )
    ours = aug.params(
        torch.tensor([[30, 40]] * n),
        torch.zeros(n, 1, 4),
        torch.zeros(n, 1, dtype=torch.bool),
        draws,
    ).photo
    assert ours is not None
    torch.manual_seed(52)
    transform, image = v2.RandomPhotometricDistort(), tv_tensors.Image(torch.zeros(3, 2, 2))
    theirs = [transform.make_params([image]) for _ in range(n)]
    d = PhotometricDistort()
    for key, factor, flag, (lo, hi) in (
        ("brightness_factor", ours.brightness, ours.do_brightness, d.brightness),
        ("contrast_factor", ours.contrast, ours.do_contrast, d.contrast),
        ("saturation_factor", ours.saturation, ours.do_saturation, d.saturation),
        ("hue_factor", ours.hue, ours.do_hue, d.hue),
    ):
        values = np.sort([t[key] for t in theirs if t[key] is not None])
        mine = np.sort(factor[flag].numpy())
        assert abs(len(values) / n - flag.float().mean().item()) < 0.04, key
        assert lo <= mine[0] and mine[-1] < hi and lo <= values[0] and values[-1] < hi, key
        assert abs(mine.mean() - values.mean()) < 0.03 * (hi - lo), key
        grid = np.linspace(lo, hi, 50)
        ks = np.abs(
            np.searchsorted(values, grid) / len(values) - np.searchsorted(mine, grid) / len(mine)
        ).max()
        assert ks < 0.06, key
    before = np.mean([t["contrast_before"] for t in theirs])
    assert abs(before - ours.contrast_before.float().mean().item()) < 0.04
    perms = [
        tuple(t["channel_permutation"].tolist())
        for t in theirs
        if t["channel_permutation"] is not None
    ]
    assert abs(len(perms) / n - ours.do_permute.float().mean().item()) < 0.04
    mine = [tuple(p) for p in ours.permutation[ours.do_permute].tolist()]
    assert set(PERMUTATIONS) == set(itertools.permutations(range(3)))
    for perm in PERMUTATIONS:
        ours_f, theirs_f = mine.count(perm) / len(mine), perms.count(perm) / len(perms)
        assert abs(ours_f - 1 / 6) < 0.03 and abs(theirs_f - 1 / 6) < 0.03, perm
        assert abs(ours_f - theirs_f) < 0.04, perm
    # every float32 torch.rand can give (k / 2^24): each permutation gets 2^24 / 6 of them
    # within one, the closest to uniform 2^24 values allow
    counts = torch.zeros(len(PERMUTATIONS), dtype=torch.int64)
    for start in range(0, 1 << 24, 1 << 21):
        u = torch.arange(start, start + (1 << 21), dtype=torch.float32) * 2.0**-24
        counts += torch.bincount(_permutation_index(u), minlength=len(PERMUTATIONS))
    assert counts.sum().item() == 1 << 24
    assert (counts.double() - (1 << 24) / 6).abs().max().item() < 1


def test_ssd_recipe_distorts_on_the_device_without_syncs_or_dynamic_shapes():
    """The whole ssd recipe from the draws (params -> distortion -> map), three batches of
    different images, sizes and draws: no host sync, no op whose shapes change with the data
    (ssd_npu.tools: what the audit checks in the step); and the distortion reaches the
    canvas: with p=0 the images differ, the boxes do not."""
    from ssd_npu.tools.op_recorder import OpRecorder
    from ssd_npu.tools.shapes import analyse

    g = torch.Generator().manual_seed(61)
    aug = DeviceAugment(Canvas(48, 48), recipe="ssd", rounds=2)
    plain = DeviceAugment(Canvas(48, 48), recipe="ssd", rounds=2, photo=PhotometricDistort(p=0.0))
    recorder = OpRecorder()
    for _ in range(3):
        slots, sizes, boxes, valid = _batch(g, 4, 3, (40, 56))
        labels = valid.long()
        draws = torch.rand(4, aug.draws, generator=g)
        draws[:, aug.layout.photo_start + photometric.APPLY] = 0.0  # brightness on all
        recorder.start_step()
        try:
            out = aug(
                slots.contiguous(memory_format=torch.channels_last),
                sizes,
                boxes,
                labels,
                valid,
                draws,
            )
        finally:
            recorder.end_step()
        ref = plain(slots, sizes, boxes, labels, valid, draws)
        assert out.images.shape == (4, 3, 48, 48)
        assert out.images.min().item() >= 0 and out.images.max().item() <= 1
        assert not torch.equal(out.images, ref.images)
        assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.valid, ref.valid)
    report = analyse(recorder)
    assert report["dynamic_ops"] == [] and report["host_syncs"] == []
