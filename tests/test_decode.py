"""Decode modes: exact gives the pixels and boxes the pipeline gave before it was made
faster; reduced decodes smaller, puts boxes where the pixels are, and stays uint8.

The "before" pipeline is kept here as the reference: PIL decode to a contiguous [3, h, w]
tensor, torchvision's own v2 RandomIoUCrop / horizontal flip / SanitizeBoundingBoxes, and
the fit that converted to float32 before resizing. Crops are random in both pipelines but
drawn differently (tests/test_iou_crop.py), so both get the same crop and flip here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.models.detection.transform import resize_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssd_npu.data.coco import CocoDetectionDataset
from ssd_npu.data.fixed_shape import FixSample, collate_fixed
from ssd_npu.data.iou_crop import CropParams, IoUCropSampler
from ssd_npu.data.transforms import SSDLiteAugmentation
from ssd_npu.errors import DataError

CANVAS = (160, 192)


def old_decode(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        pil = img.convert("RGB")
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


def old_augment(image, boxes, labels, params: CropParams | None, flip: bool):
    """torchvision v2 transforms given the crop (as RandomIoUCrop.transform takes it)."""
    h, w = image.shape[-2:]
    image = tv_tensors.Image(image)
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    if params is not None:
        crop = v2.RandomIoUCrop()
        p = dict(top=params.top, left=params.left, height=params.height, width=params.width)
        p["is_within_crop_area"] = torch.from_numpy(params.keep)
        image, bb = crop.transform(image, p), crop.transform(bb, p)
    if flip:
        image, bb = TF.horizontal_flip(image), TF.horizontal_flip(bb)
    out = v2.SanitizeBoundingBoxes()(image, {"boxes": bb, "labels": labels})
    return out[0], out[1]["boxes"], out[1]["labels"]


def old_fit(image, boxes, canvas, mode, pad_value=0.0):
    """The fit as it was: to_dtype(float32, scale=True) on the (contiguous) image, resize."""
    H, W = canvas
    h, w = image.shape[-2:]
    x = TF.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)

    def resize(t, size):
        return torch.nn.functional.interpolate(t[None], size=list(size), mode="bilinear")[0]

    if mode == "stretch":
        return resize(x, (H, W)), resize_boxes(boxes, [h, w], [H, W]), (H, W)
    if mode == "pad" and h <= H and w <= W:
        ch, cw, content = h, w, x
    else:
        s = min(H / h, W / w)
        ch, cw = max(1, min(H, round(h * s))), max(1, min(W, round(w * s)))
        content = resize(x, (ch, cw))
    out = x.new_full((3, H, W), float(pad_value))
    out[:, :ch, :cw] = content
    return out, resize_boxes(boxes, [h, w], [ch, cw]), (ch, cw)


def _clip(b, ch, cw):
    x, y = b[:, 0::2].clamp(0, cw), b[:, 1::2].clamp(0, ch)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)


@pytest.mark.parametrize("threads", [1, None])  # workers run one thread
def test_exact_mode_equals_the_old_pipeline(tiny_coco, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        ds = CocoDetectionDataset(tiny_coco, "train2017")
        torch.manual_seed(0)
        checked = 0
        for i in range(len(ds)):
            image, target = ds[i]
            path = ds.img_dir / ds.coco.imgs[ds.ids[i]]["file_name"]
            assert isinstance(image, tv_tensors.Image) and torch.equal(image, old_decode(path))
            boxes, labels = target["boxes"].as_subclass(torch.Tensor), target["labels"]
            h, w = image.shape[-2:]
            crops = [None] + ([IoUCropSampler()(boxes, (h, w))] if len(boxes) else [])
            for params in crops:
                for flip in (False, True):
                    ref = old_augment(old_decode(path), boxes, labels, params, flip)
                    aug = SSDLiteAugmentation(lambda b, s, p=params: p, float(flip))
                    new_image, new_target = aug(image, target)
                    assert torch.equal(new_image, ref[0])
                    assert torch.equal(new_target["boxes"], ref[1])
                    assert torch.equal(new_target["labels"], ref[2])
                    for mode in ("stretch", "letterbox", "pad"):
                        fixed = FixSample(CANVAS, 64, mode, pad_value=0.5)  # no subset
                        got = fixed(new_image, {**new_target, "image_id": ds.ids[i]})
                        want, want_boxes, (ch, cw) = old_fit(ref[0], ref[1], CANVAS, mode, 0.5)
                        assert got["image"].dtype == torch.float32 and got["image"].is_contiguous()
                        assert torch.equal(got["image"], want), (i, params, flip, mode)
                        n = int(got["valid"].sum())
                        assert torch.equal(got["boxes"][:n], _clip(want_boxes, ch, cw)[:n])
                        checked += 1
        assert checked > 100
    finally:
        torch.set_num_threads(before)


def _one_image_set(root: Path, img: Image.Image, box: list[float], name="a.jpg") -> Path:
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    img.save(root / "val" / name, quality=95)
    w, h = img.size
    data = {
        "images": [{"id": 1, "file_name": name, "width": w, "height": h}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 1.0, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "a", "supercategory": "s"}],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


@pytest.fixture()
def square_set(tmp_path) -> Path:
    """1280 x 960, dark, one bright rectangle: box xywh (400, 300, 400, 400)."""
    arr = np.full((960, 1280, 3), 30, np.uint8)
    arr[300:700, 400:800] = 230
    return _one_image_set(tmp_path / "sq", Image.fromarray(arr), [400.0, 300.0, 400.0, 400.0])


@pytest.mark.parametrize(
    "crop, flip, fit, canvas",
    [
        (None, False, "letterbox", (160, 160)),  # 960 x 1280 -> 120 x 160: 1/8 scale
        ((100, 200, 800, 1000), True, "letterbox", (320, 320)),  # 1/2 scale, mirrored
        ((130, 333, 777, 901), False, "stretch", (256, 320)),  # odd offsets: rounding
        ((50, 100, 900, 1100), True, "pad", (320, 320)),
    ],
)
def test_reduced_boxes_follow_the_pixels(square_set, crop, flip, fit, canvas):
    ds = CocoDetectionDataset(square_set, "val", decode="reduced")
    image, target = ds[0]
    params = None if crop is None else CropParams(*crop, np.ones(1, bool))
    aug = SSDLiteAugmentation(lambda b, s: params, float(flip))
    image, target = aug(image, target)
    sample = FixSample(canvas, 4, fit)(image, target)
    out = sample["image"]
    assert out.dtype == torch.uint8 and out.shape == (3, *canvas)
    x0, y0, x1, y1 = sample["boxes"][0].tolist()
    inside = out[:, round(y0) + 2 : round(y1) - 2, round(x0) + 2 : round(x1) - 2].float()
    assert inside.mean() > 220
    ring = out.float().clone()
    ring[:, max(0, round(y0) - 2) : round(y1) + 2, max(0, round(x0) - 2) : round(x1) + 2] = -1
    ch, cw = sample["content_size"]
    outside = ring[:, :ch, :cw]
    assert outside[outside >= 0].mean() < 35
    # and where the exact pipeline puts the box, to a pixel
    exact = CocoDetectionDataset(square_set, "val")
    e_image, e_target = aug(*exact[0])
    want = FixSample(canvas, 4, fit)(e_image, e_target)
    torch.testing.assert_close(sample["boxes"], want["boxes"], atol=1.0, rtol=0)
    assert sample["content_size"] == want["content_size"] and sample["scale"] == want["scale"]


def test_reduced_at_full_scale_is_close_to_exact(tiny_coco):
    # sides 160..800 on a 448 canvas: never 2x larger, so decoded at full scale
    exact = CocoDetectionDataset(tiny_coco, "val2017")
    reduced = CocoDetectionDataset(tiny_coco, "val2017", decode="reduced")
    fix = FixSample((448, 448), 32, "stretch")
    samples = []
    for i in range(len(exact)):
        a, b = fix(*exact[i]), fix(*reduced[i])
        diff = (a["image"] * 255 - b["image"].float()).abs()
        # uint8 rounding of the same resize: at most one level (plus float error in x255)
        assert diff.mean() < 0.5 and diff.max() < 1.0 + 1e-4
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        samples.append(b)
    batch = collate_fixed(samples)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (len(exact), 3, 448, 448)


def test_reduced_corrupt_file_fails_or_becomes_an_empty_sample(square_set):
    path = square_set / "val" / "a.jpg"
    path.write_bytes(path.read_bytes()[:3000])  # the header survives: the decode fails later
    fix = FixSample((64, 64), 4, "letterbox", pad_value=1.0)
    ds = CocoDetectionDataset(square_set, "val", decode="reduced")
    with pytest.raises(DataError, match=r"a\.jpg cannot be decoded"):
        fix(*ds[0])
    ds = CocoDetectionDataset(square_set, "val", decode="reduced", on_bad_image="skip")
    with pytest.warns(UserWarning, match="a.jpg"):
        sample = fix(*ds[0])
    assert sample["skipped"] == 1 and not sample["valid"].any()
    assert sample["image"].dtype == torch.uint8 and bool((sample["image"] == 255).all())


def test_decode_mode_is_checked(tiny_coco):
    with pytest.raises(ValueError, match="decode='fast' is not valid; choose one of: exact"):
        CocoDetectionDataset(tiny_coco, "val2017", decode="fast")


def test_model_scales_uint8_canvases_on_the_device():
    from ssd_npu.models.detector import FixedDetector, build_detector

    torch.manual_seed(0)
    model = FixedDetector(build_detector(3, (64, 64)), (64, 64)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        got = model(images)
        want = model(TF.to_dtype(images, torch.float32, scale=True))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_deferred_crop_and_flip_compose(square_set):
    from ssd_npu.data.decode import DeferredImage, fill_value

    img = DeferredImage.open(square_set / "val" / "a.jpg")
    assert img.shape == (3, 960, 1280) and img.region == (0, 0, 960, 1280)
    a = img.crop(100, 200, 500, 600)  # rows 100..600, columns 200..800 of the file
    assert a.region == (100, 200, 500, 600) and a.shape == (3, 500, 600)
    b = a.hflip().crop(10, 50, 100, 150)  # columns 50..200 of the mirror: 600..750 unmirrored
    assert b.region == (110, 600, 100, 150) and b.flipped
    assert fill_value(0.0) == 0 and fill_value(0.5) == 128 and fill_value(1.0) == 255


def test_deferred_image_decodes_to_the_exact_pixels_on_request(tiny_coco):
    exact = CocoDetectionDataset(tiny_coco, "val2017")
    reduced = CocoDetectionDataset(tiny_coco, "val2017", decode="reduced")
    for i in range(len(exact)):
        want, _ = exact[i]
        image, _ = reduced[i]
        assert torch.equal(image.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))
        h, w = want.shape[-2:]
        part = image.crop(1, 2, h - 3, w - 5).hflip().decode()
        assert torch.equal(part, want[:, 1 : h - 2, 2 : w - 3].flip(-1))


def test_libjpeg_turbo_through_torchcodec_gives_pils_pixels(tiny_coco, tmp_path):
    """The colour-JPEG fast path decodes to exactly PIL's pixels: the synthetic set's files
    and photo-like ones saved with every chroma subsampling, several qualities, baseline and
    progressive, odd sizes. A grey JPEG takes PIL's path (torchcodec's is for YCbCr only)."""
    pytest.importorskip("torchcodec.decoders")
    from ssd_npu.data.decode import _decode_jpeg_turbo, decode_rgb, load_rgb

    rng = np.random.default_rng(0)
    files = sorted((tiny_coco / "train2017").glob("*.jpg"))[:6]
    base = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((331, 247), Image.BICUBIC))
    for i, (sub, quality, progressive) in enumerate(
        [(0, 95, False), (1, 75, False), (2, 90, False), (2, 50, True), (0, 85, True)]
    ):
        path = tmp_path / f"photo_{i}.jpg"
        Image.fromarray(smooth).save(
            path, quality=quality, subsampling=sub, progressive=progressive
        )
        files.append(path)
    for path in files:
        fast = _decode_jpeg_turbo(path.read_bytes())
        assert fast is not None, path
        want = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert torch.equal(fast, want), path
        assert torch.equal(decode_rgb(path), want) and decode_rgb(path).stride()[0] == 1
    grey = tmp_path / "grey.jpg"
    Image.fromarray(smooth[..., 0]).save(grey, quality=90)
    assert torch.equal(
        decode_rgb(grey), torch.from_numpy(np.array(load_rgb(grey))).permute(2, 0, 1)
    )


def test_colour_jpeg_reads_the_frame_header_as_pil_does(tmp_path):
    """`colour_jpeg` (the marker walk that picks libjpeg-turbo's path) agrees with PIL's
    header parse: colour baseline and progressive JPEGs (also behind EXIF), not grey, CMYK,
    PNG or a truncated header."""
    import io

    from ssd_npu.data.decode import colour_jpeg

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    cases = {}
    for name, image, kwargs in [
        ("rgb", rgb, {}),
        ("progressive", rgb, {"progressive": True}),
        ("exif", rgb, {"exif": rgb.getexif().tobytes() + b"x" * 3000}),
        ("grey", rgb.convert("L"), {}),
        ("cmyk", rgb.convert("CMYK"), {}),
    ]:
        out = io.BytesIO()
        image.save(out, "JPEG", **kwargs)
        cases[name] = out.getvalue()
    png = io.BytesIO()
    rgb.save(png, "PNG")
    cases["png"] = png.getvalue()
    for name, data in cases.items():
        with Image.open(io.BytesIO(data)) as im:
            want = im.format == "JPEG" and im.mode == "RGB"
        assert colour_jpeg(data) == want, name
    assert colour_jpeg(cases["rgb"]) and not colour_jpeg(cases["rgb"][:12])
