"""Fixed-shape fit, target padding, collation, and the loaders built on them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ssd_npu.build import loader_spec, shape_path
from ssd_npu.config import TrainConfig
from ssd_npu.data.fixed_shape import (
    FixedBatch,
    FixSample,
    collate_fixed,
    fit_to_canvas,
    pad_targets,
    unfit_boxes,
)
from ssd_npu.data.loader import Loaders, build_loaders
from ssd_npu.data.samplers import EpochSampler
from ssd_npu.device.backend import Device
from ssd_npu.device.distributed import World


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _boxes(h: int, w: int) -> torch.Tensor:
    return torch.tensor(
        [[0.0, 0.0, w, h], [w * 0.1, h * 0.2, w * 0.5, h * 0.9], [3.5, 7.25, 9.0, 11.0]]
    )


@pytest.mark.parametrize("hw", [(240, 180), (517, 733), (320, 320), (97, 401)])
def test_stretch_matches_torchvision_transform(hw):
    h, w = hw
    image, boxes = _image(h, w), _boxes(h, w)
    out, out_boxes, info = fit_to_canvas(image, boxes, (320, 320), "stretch")
    tv = GeneralizedRCNNTransform(
        320, 320, [0, 0, 0], [1, 1, 1], size_divisible=1, fixed_size=(320, 320)
    )
    tv.eval()
    images, targets = tv(
        [image.float() / 255],
        [{"boxes": boxes.clone(), "labels": torch.ones(3, dtype=torch.int64)}],
    )
    assert out.dtype == torch.float32 and out.shape == (3, 320, 320)
    torch.testing.assert_close(out, images.tensors[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out_boxes, targets[0]["boxes"], atol=1e-6, rtol=0)
    assert info.orig_size == (h, w) and info.content_size == (320, 320) and not info.downscaled


def test_stretch_non_square_canvas_is_h_w():
    # torchvision's fixed_size is (W, H); our canvas is (H, W)
    image, boxes = _image(100, 200), _boxes(100, 200)
    out, out_boxes, info = fit_to_canvas(image, boxes, (256, 384), "stretch")
    tv = GeneralizedRCNNTransform(
        256, 384, [0] * 3, [1] * 3, size_divisible=1, fixed_size=(384, 256)
    )
    tv.eval()
    images, targets = tv(
        [image.float() / 255],
        [{"boxes": boxes.clone(), "labels": torch.ones(3, dtype=torch.int64)}],
    )
    assert out.shape == (3, 256, 384)
    torch.testing.assert_close(out, images.tensors[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out_boxes, targets[0]["boxes"], atol=1e-6, rtol=0)
    assert info.scale == pytest.approx((384 / 200, 256 / 100))


def test_letterbox_hand_computed():
    # 200x100 (h, w) into canvas (320, 256): s = min(1.6, 2.56) = 1.6 -> content 320 x 160
    image = torch.full((3, 200, 100), 255, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 200.0]])
    out, out_boxes, info = fit_to_canvas(image, boxes, (320, 256), "letterbox", pad_value=0.5)
    assert info.content_size == (320, 160) and info.scale == pytest.approx((1.6, 1.6))
    torch.testing.assert_close(out_boxes, torch.tensor([[16.0, 32.0, 80.0, 320.0]]))
    assert torch.all(out[:, :, :160] == 1.0) and torch.all(out[:, :, 160:] == 0.5)


def test_letterbox_wide_image_pads_bottom():
    image = torch.zeros((3, 100, 400), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 400.0, 100.0]])
    out, out_boxes, info = fit_to_canvas(image, boxes, (320, 320), "letterbox", pad_value=1.0)
    assert info.content_size == (80, 320)
    torch.testing.assert_close(out_boxes, torch.tensor([[0.0, 0.0, 320.0, 80.0]]))
    assert torch.all(out[:, 80:] == 1.0) and torch.all(out[:, :80] == 0.0)


def test_pad_small_image_not_resized():
    image = _image(150, 200)
    boxes = torch.tensor([[5.0, 6.0, 100.0, 150.0]])
    out, out_boxes, info = fit_to_canvas(image, boxes, (320, 256), "pad", pad_value=0.0)
    assert info.scale == (1.0, 1.0) and info.content_size == (150, 200) and not info.downscaled
    torch.testing.assert_close(out[:, :150, :200], image.float() / 255)
    assert torch.all(out[:, 150:] == 0) and torch.all(out[:, :, 200:] == 0)
    torch.testing.assert_close(out_boxes, boxes)


def test_pad_large_image_downscaled():
    # 640x400 (h, w) into (320, 320): s = 0.5 -> content 320 x 200
    image = _image(640, 400)
    boxes = torch.tensor([[100.0, 200.0, 400.0, 640.0]])
    out, out_boxes, info = fit_to_canvas(image, boxes, (320, 320), "pad")
    assert info.downscaled and info.content_size == (320, 200)
    torch.testing.assert_close(out_boxes, torch.tensor([[50.0, 100.0, 200.0, 320.0]]))
    sample = FixSample((320, 320), 4, "pad")(
        image, {"boxes": boxes, "labels": torch.tensor([1]), "image_id": 3}
    )
    assert sample["downscaled"] == 1


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "pad"])
@pytest.mark.parametrize("hw", [(240, 180), (700, 300), (50, 90)])
def test_unfit_round_trip(mode, hw):
    h, w = hw
    boxes = _boxes(h, w)
    _, fitted, info = fit_to_canvas(_image(h, w), boxes, (320, 256), mode)
    torch.testing.assert_close(unfit_boxes(fitted, info), boxes, atol=1e-3, rtol=1e-5)


def test_pad_targets_padding_and_selection():
    boxes = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    labels = torch.arange(1, 6)
    b, lab, valid, dropped = pad_targets(boxes, labels, 8, torch.Generator().manual_seed(0))
    assert b.shape == (8, 4) and lab.shape == (8,) and valid.tolist() == [True] * 5 + [False] * 3
    assert (
        dropped == 0 and torch.equal(b[:5], boxes) and b[5:].abs().sum() == 0 and lab[5:].sum() == 0
    )
    b, lab, valid, dropped = pad_targets(boxes, labels, 3, torch.Generator().manual_seed(0))
    assert dropped == 2 and valid.all() and b.dtype == torch.float32 and lab.dtype == torch.int64
    assert lab.tolist() == sorted(lab.tolist())  # original relative order kept
    assert torch.equal(b, boxes[lab - 1])  # rows stay paired with their labels
    again = pad_targets(boxes, labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], lab)
    subsets = {
        tuple(pad_targets(boxes, labels, 3, torch.Generator().manual_seed(s))[1].tolist())
        for s in range(20)
    }
    assert len(subsets) > 1
    empty = pad_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 4, torch.Generator())
    assert empty[0].shape == (4, 4) and not empty[2].any() and empty[3] == 0


def test_fix_sample_seeded_by_image_and_epoch():
    fix = FixSample((128, 128), 2, "stretch", seed=7)
    target = {"boxes": torch.rand(10, 4) * 50, "labels": torch.arange(1, 11), "image_id": 5}
    target["boxes"][:, 2:] += 50
    a, b = fix(_image(100, 100), target, epoch=0), fix(_image(100, 100), target, epoch=0)
    assert torch.equal(a["labels"], b["labels"]) and a["boxes_dropped"] == 8
    picks = {tuple(fix(_image(100, 100), target, epoch=e)["labels"].tolist()) for e in range(10)}
    assert len(picks) > 1


def test_collate_shapes_identical():
    fix = FixSample((320, 320), 6, "letterbox")
    samples = []
    for i, (h, w, n) in enumerate([(100, 300, 0), (480, 200, 3), (320, 320, 9)]):
        boxes = torch.tensor([[1.0, 1.0, 20.0, 30.0]]).repeat(n, 1)
        samples.append(
            fix(
                _image(h, w, i),
                {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "image_id": i},
            )
        )
    batch = collate_fixed(samples)
    assert isinstance(batch, FixedBatch)
    assert batch.images.shape == (3, 3, 320, 320) and batch.boxes.shape == (3, 6, 4)
    assert (
        batch.labels.shape == (3, 6)
        and batch.valid.shape == (3, 6)
        and batch.image_ids.shape == (3,)
    )
    assert batch.orig_sizes.tolist() == [
        [100, 300],
        [480, 200],
        [320, 320],
    ] and batch.scales.shape == (3, 2)
    assert batch.valid.sum(1).tolist() == [0, 3, 6] and batch.boxes_dropped == 3
    assert batch.to("cpu") is batch


def _cfg(**kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.batch_size, cfg.max_boxes, cfg.canvas = 4, 8, [128, 128]
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _loaders(root, **kw) -> Loaders:
    cfg = _cfg(**kw)
    return build_loaders(
        loader_spec(cfg, World(), Device("cpu", None)), shape_path(cfg).batches, root
    )


def test_fixed_loaders_static_shapes_and_padded_val(tiny_coco):
    data = _loaders(tiny_coco, num_workers=0, shape="fixed")
    train, val, val_ds = data.train, data.val, data.val_set
    assert isinstance(data.train_sampler, EpochSampler) and train.sampler is data.train_sampler
    batches = list(train)
    assert len(batches) == 3  # 12 images, batch 4, drop_last
    for b in batches + list(val):
        assert (
            b.images.shape == (4, 3, 128, 128)
            and b.boxes.shape == (4, 8, 4)
            and b.valid.shape == (4, 8)
        )
    val_ids = torch.cat([b.image_ids for b in val])
    assert (val_ids == -1).sum() == 2 and sorted(val_ids[val_ids >= 0].tolist()) == val_ds.ids


@pytest.mark.parametrize("shape", ["fixed", "dynamic"])
def test_loaders_deterministic_across_workers(tiny_coco, shape):
    def run(workers):
        train = _loaders(tiny_coco, num_workers=workers, shape=shape).train
        return [b for _ in range(2) for b in train]  # two epochs

    a, b = run(0), run(2)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.image_ids, y.image_ids)
        if shape == "fixed":
            assert (
                torch.equal(x.images, y.images)
                and torch.equal(x.boxes, y.boxes)
                and torch.equal(x.valid, y.valid)
            )
        else:
            assert all(torch.equal(i, j) for i, j in zip(x.images, y.images, strict=True))
            assert all(
                torch.equal(s["boxes"], t["boxes"])
                for s, t in zip(x.targets, y.targets, strict=True)
            )
    assert not torch.equal(a[0].image_ids, a[3].image_ids)  # epochs reshuffle


def test_epoch_sampler_resumes_with_set_epoch_and_skip():
    def sampler():
        inner = DistributedSampler(range(12), num_replicas=1, rank=0, seed=3, drop_last=True)
        return EpochSampler(inner, batch_size=2)

    s = sampler()
    epoch0, epoch1 = list(s), list(s)
    assert [k.epoch for k in epoch0] == [0] * 12 and [k.epoch for k in epoch1] == [1] * 12
    assert [k.index for k in epoch1] != [k.index for k in epoch0]  # reshuffled per epoch
    assert sorted(k.index for k in epoch0) == list(range(12))
    again = sampler()
    again.set_epoch(1)
    again.skip(3)  # resume after 3 batches of 2: the rest of the same epoch
    assert len(again) == 6 and list(again) == epoch1[6:]
    assert len(again) == 12 and [k.epoch for k in again] == [2] * 12  # skips once only
