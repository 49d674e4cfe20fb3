"""data.augment_on=device, the host side (ssd_npu/data/slots.py): each image at the top-left of
a zero uint8 slot (scaled down only when larger), FixSample's box subset, per-sample seeded
uniforms for the device's augmentation, and the SlotBatch collate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.models.detection.transform import resize_boxes

from ssd_npu.data.decode import DeferredImage
from ssd_npu.data.fit import fit_to_canvas
from ssd_npu.data.fixed_shape import FixSample, sample_seed
from ssd_npu.data.slots import SlotBatch, SlotSample, collate_slots


def _sample(h: int, w: int, n: int, image_id: int = 7, seed: int = 0):
    """What CocoDetectionDataset returns (decode=exact): a uint8 image and n boxes inside it."""
    gen = torch.Generator().manual_seed(seed)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    wh = 1 + torch.rand(n, 2, generator=gen) * torch.tensor([w / 2 - 1, h / 2 - 1])
    boxes = tv_tensors.BoundingBoxes(torch.cat([xy, xy + wh], 1), format="XYXY", canvas_size=(h, w))
    labels = torch.arange(1, n + 1, dtype=torch.int64)
    target = {"boxes": boxes, "labels": labels, "image_id": image_id, "orig_size": (h, w)}
    target.update(degenerate=1, clipped=2, skipped=0)
    return image, target


def test_image_at_top_left_of_a_zero_slot():
    image, target = _sample(20, 30, 3)
    out = SlotSample((32, 48), max_boxes=4, draws=5)(image, target)
    slot = out["slot"]
    assert slot.dtype == torch.uint8 and tuple(slot.shape) == (3, 32, 48)
    assert torch.equal(slot[:, :20, :30], image.as_subclass(torch.Tensor))
    assert not slot[:, 20:].any() and not slot[:, :, 30:].any()
    assert out["size"] == (20, 30) and out["downscaled"] == 0
    assert out["image_id"] == 7 and (out["degenerate"], out["clipped"], out["skipped"]) == (1, 2, 0)


def test_slots_stay_channels_last_through_the_collate():
    """The decoder's [h, w, 3] memory is kept: the slot and the batch are channels-last, so
    neither the worker's copy nor the collate transposes pixels."""
    image, target = _sample(20, 30, 3)
    image = tv_tensors.Image(image.permute(1, 2, 0).contiguous().permute(2, 0, 1))  # as decoded
    fill = SlotSample((32, 48), max_boxes=4, draws=5)
    one = fill(image, target)
    assert one["slot"].permute(1, 2, 0).is_contiguous()
    batch = collate_slots([one, fill(image, {**target, "image_id": 8})])
    assert batch.slots.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.slots[1, :, :20, :30], image.as_subclass(torch.Tensor))
    assert not batch.slots[:, :, 20:].any() and not batch.slots[:, :, :, 30:].any()


def test_boxes_unchanged_when_the_image_fits():
    image, target = _sample(32, 48, 3)  # exactly the slot: no resize
    out = SlotSample((32, 48), max_boxes=5, draws=2)(image, target)
    assert out["boxes"].dtype == torch.float32 and tuple(out["boxes"].shape) == (5, 4)
    assert torch.equal(out["boxes"][:3], target["boxes"].as_subclass(torch.Tensor))
    assert not out["boxes"][3:].any()
    assert out["labels"].tolist() == [1, 2, 3, 0, 0] and out["labels"].dtype == torch.int64
    assert out["valid"].tolist() == [True, True, True, False, False]
    assert out["boxes_dropped"] == 0 and out["downscaled"] == 0


@pytest.mark.parametrize(("h", "w", "size"), [(100, 50, (40, 20)), (30, 130, (15, 64))])
def test_larger_image_is_scaled_down_keeping_aspect(h, w, size):
    image, target = _sample(h, w, 4)
    out = SlotSample((40, 64), max_boxes=4, draws=1)(image, target)
    nh, nw = size
    assert out["size"] == size and out["downscaled"] == 1
    raw = image.as_subclass(torch.Tensor).to(torch.float32)[None]
    resized = F.interpolate(raw, size=[nh, nw], mode="bilinear", align_corners=False)[0]
    assert torch.equal(out["slot"][:, :nh, :nw], resized.round().clamp(0, 255).to(torch.uint8))
    assert not out["slot"][:, nh:].any() and not out["slot"][:, :, nw:].any()
    boxes = target["boxes"].as_subclass(torch.Tensor)
    expected = resize_boxes(boxes, [h, w], [nh, nw])
    expected[:, 0::2] = expected[:, 0::2].clamp(0, nw)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, nh)
    assert torch.equal(out["boxes"], expected)
    # the same content size, box mapping and count as the host's fit=pad on a slot-sized canvas
    fitted, fit_boxes, info = fit_to_canvas(image, target["boxes"], (40, 64), "pad")
    assert info.content_size == size and info.downscaled
    assert torch.equal(out["boxes"], fit_boxes)
    diff = (fitted[:, :nh, :nw] * 255 - out["slot"][:, :nh, :nw].float()).abs().max()
    assert diff <= 0.5 + 1e-3  # /255 before the resize there, rounding here


def test_box_subset_is_fix_samples_for_the_same_key():
    image, target = _sample(24, 40, 10, image_id=11)
    for epoch in (0, 3):
        out = SlotSample((32, 48), max_boxes=4, draws=2, seed=5)(image, target, epoch)
        fixed = FixSample((32, 48), 4, fit="pad", seed=5)(image, target, epoch)
        assert out["boxes_dropped"] == fixed["boxes_dropped"] == 6
        assert torch.equal(out["labels"], fixed["labels"])
        assert torch.equal(out["boxes"], fixed["boxes"])  # pad of a fitting image: same pixels
        assert out["valid"].all()
    other = SlotSample((32, 48), max_boxes=4, draws=2, seed=5)(image, target, 1)
    first = SlotSample((32, 48), max_boxes=4, draws=2, seed=5)(image, target, 0)
    assert not torch.equal(other["labels"], first["labels"])  # the subset follows the epoch


def test_draws_follow_seed_image_and_epoch():
    image, target = _sample(16, 16, 1, image_id=3)
    finish = SlotSample((32, 32), max_boxes=2, draws=6, seed=9)
    a, b = finish(image, target, 2)["draws"], finish(image, target, 2)["draws"]
    assert a.dtype == torch.float32 and tuple(a.shape) == (6,)
    assert torch.equal(a, b) and bool((a >= 0).all() and (a < 1).all())
    key = torch.Generator().manual_seed(sample_seed(9, 3, 2, 2))
    assert torch.equal(a, torch.rand(6, generator=key))
    other_image = finish(image, {**target, "image_id": 4}, 2)["draws"]
    other_epoch = finish(image, target, 3)["draws"]
    other_seed = SlotSample((32, 32), max_boxes=2, draws=6, seed=10)(image, target, 2)["draws"]
    for other in (other_image, other_epoch, other_seed):
        assert not torch.equal(a, other)


def _batch() -> SlotBatch:
    finish = SlotSample((32, 48), max_boxes=3, draws=4, seed=1)
    sizes = [(20, 30), (32, 48), (64, 40)]
    samples = [finish(*_sample(h, w, 5, image_id=i)) for i, (h, w) in enumerate(sizes)]
    return collate_slots(samples)


def test_collate_shapes_dtypes_and_counters():
    batch = _batch()
    expected = {
        "slots": ((3, 3, 32, 48), torch.uint8),
        "sizes": ((3, 2), torch.int64),
        "boxes": ((3, 3, 4), torch.float32),
        "labels": ((3, 3), torch.int64),
        "valid": ((3, 3), torch.bool),
        "draws": ((3, 4), torch.float32),
        "image_ids": ((3,), torch.int64),
    }
    for name, (shape, dtype) in expected.items():
        t = getattr(batch, name)
        assert (tuple(t.shape), t.dtype) == (shape, dtype), name
    assert batch.sizes.tolist() == [[20, 30], [32, 48], [32, 20]]
    assert batch.image_ids.tolist() == [0, 1, 2]
    assert (batch.boxes_dropped, batch.degenerate, batch.clipped) == (6, 3, 6)
    assert (batch.downscaled, batch.skipped) == (1, 0)


def test_pin_memory_and_to_move_every_tensor(monkeypatch):
    batch = _batch()
    names = ("slots", "sizes", "boxes", "labels", "valid", "draws", "image_ids")
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned is batch and all(getattr(batch, n).is_pinned() for n in names)
    else:  # no accelerator to page-lock for: check that every tensor goes through pin_memory
        seen = []
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: seen.append(t) or t.clone())
        assert batch.pin_memory() is batch and len(seen) == len(names)
    moved = batch.to("meta")
    assert moved is batch and all(getattr(batch, n).is_meta for n in names)
    assert batch.boxes_dropped == 6 and isinstance(batch.downscaled, int)


def test_deferred_image_is_refused(tmp_path: Path):
    image = DeferredImage(tmp_path / "a.jpg", (10, 10), (0, 0, 10, 10))
    _, target = _sample(10, 10, 1)
    with pytest.raises(ValueError, match="data.decode=exact"):
        SlotSample((32, 32), max_boxes=2, draws=1)(image, target)
