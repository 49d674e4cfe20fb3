"""data.augment_on=device as a whole: the slot batches, the step that augments and fits them,
the run (same seed, resume, recipes per model), against the host pipeline it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssd_npu.build import build_training, resolve_augment_on
from ssd_npu.data.slots import SlotBatch
from ssd_npu.device.backend import Device
from ssd_npu.engine.loop import Progress
from ssd_npu.errors import ConfigError
from ssd_npu.train import run
from tests.helpers import FAST, compose_cfg, losses, train_loop, train_step

# Larger than every image of the tiny set: nothing is scaled down on the host, so the device
# fit sees the very pixels the host fit does.
WIDE_SLOT = "data.slot=[800,800]"  # the tiny set's largest image is 800 x 790


def _first_step_loss(tiny_cfg, tmp_path, *overrides: str) -> tuple[float, object]:
    t = build_training(tiny_cfg(*FAST, "augment=false", *overrides))
    batch = next(iter(t.data.train))
    values = train_step(train_loop(t, tmp_path), batch, Progress())
    return values["total"], batch


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "pad"])
def test_device_fit_gives_the_host_fits_first_loss(tiny_cfg, tmp_path, fit):
    host, host_batch = _first_step_loss(tiny_cfg, tmp_path, f"fit={fit}")
    device, slot_batch = _first_step_loss(
        tiny_cfg, tmp_path, f"fit={fit}", "data.augment_on=device", WIDE_SLOT
    )
    assert isinstance(slot_batch, SlotBatch) and slot_batch.downscaled == 0
    assert torch.equal(slot_batch.image_ids, host_batch.image_ids)
    assert device == pytest.approx(host, rel=1e-4)


@pytest.mark.slow  # four short runs, ~60 s
def test_same_seed_same_losses_and_resume_with_device_augmentation(tiny_cfg, tmp_path):
    on_device = (*FAST, "augment=true", "data.augment_on=device", "data.slot=[320,320]")
    a, b, split = tmp_path / "a", tmp_path / "b", tmp_path / "split"
    run(tiny_cfg(*on_device, "num_workers=2", "max_steps=8", out=a))
    run(tiny_cfg(*on_device, "num_workers=0", "max_steps=8", out=b))
    assert losses(a) == losses(b) and len(losses(a)) == 8  # any worker count
    run(tiny_cfg(*on_device, "max_steps=4", out=split))
    run(tiny_cfg(*on_device, "max_steps=8", "resume=auto", out=split))
    # steps 7-8 cross the epoch boundary (6 batches per epoch): new draws, the same ones
    assert losses(split) == losses(a)


def test_device_augmentation_changes_the_first_loss(tiny_cfg, tmp_path):
    """The draws reach the step: with the recipe on, the first batch's crops and flips change
    the loss the plain device fit gives."""
    on = ("data.augment_on=device", "data.slot=[320,320]")
    t = build_training(tiny_cfg(*FAST, "augment=true", *on))
    augmented = train_step(train_loop(t, tmp_path), next(iter(t.data.train)), Progress())
    plain, _ = _first_step_loss(tiny_cfg, tmp_path, *on)
    assert augmented["total"] != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize(
    ("overrides", "device_type", "want"),
    [
        ((), "cpu", "host"),
        ((), "cuda", "device"),
        ((), "npu", "device"),
        (("data.augment_on=device",), "cpu", "device"),
        (("data.augment_on=host",), "cuda", "host"),
        (("shape=dynamic",), "cuda", "host"),
        (("max_boxes=[8,16]",), "cuda", "host"),
        (("model=ssd300_vgg16",), "cuda", "device"),  # ssd recipe, photometric included
        (("model=ssd300_vgg16", "augment=false"), "cuda", "device"),
        (("model=retinanet_resnet50_fpn",), "npu", "device"),  # hflip
    ],
)
def test_auto_picks_the_device_where_it_applies(overrides, device_type, want):
    assert resolve_augment_on(compose_cfg(*overrides), Device(device_type, 0)) == want


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("max_boxes=[8,16]",), "buckets"),
    ],
)
def test_device_where_it_does_not_apply_says_why(overrides, needle):
    cfg = compose_cfg("data.augment_on=device", *overrides)
    with pytest.raises(ConfigError, match=needle) as err:
        resolve_augment_on(cfg, Device("cuda", 0))
    assert "data.augment_on=host" in str(err.value)


def test_device_decode_gives_the_exact_decodes_first_loss(tiny_cfg, tmp_path):
    """data.decode=device: the workers send JPEG bytes, the step decodes the batch (here with
    libjpeg-turbo on the cpu; nvJPEG on cuda) into the slots: the same pixels as the host's
    exact decode, so the same first loss."""
    on = ("data.augment_on=device", WIDE_SLOT)
    exact, exact_batch = _first_step_loss(tiny_cfg, tmp_path, *on)
    device, batch = _first_step_loss(tiny_cfg, tmp_path, *on, "data.decode=device")
    assert batch.jpegs is not None and batch.slots is not None  # decoded by the step
    assert sum(j.numel() > 0 for j in batch.jpegs) + batch.host_decoded == len(batch.jpegs)
    assert torch.equal(batch.slots, exact_batch.slots)
    assert device == pytest.approx(exact, rel=1e-6)


def test_device_decode_falls_back_to_the_host_and_counts(tmp_path):
    """Grey JPEGs, PNGs and images larger than the slot are decoded by the worker (counted in
    host_decoded); the slots are the exact path's either way."""
    from PIL import Image

    from ssd_npu.data.decode import DeferredImage, decode_rgb
    from ssd_npu.data.slots import SlotSample, collate_slots

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    files = {
        "colour.jpg": Image.fromarray(colour),
        "grey.jpg": Image.fromarray(colour[..., 0]),
        "colour.png": Image.fromarray(colour),
        "large.jpg": Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)),
    }
    target = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "labels": torch.tensor([1])}
    encoded = SlotSample((64, 64), 4, draws=3, device_decode=True)
    exact = SlotSample((64, 64), 4, draws=3)
    samples, wants = [], []
    for i, (name, image) in enumerate(files.items()):
        path = tmp_path / name
        image.save(path, quality=90) if name.endswith(".jpg") else image.save(path)
        key = {**target, "image_id": i}
        samples.append(encoded(DeferredImage.open(path), key))
        wants.append(exact(decode_rgb(path), key))
    assert [s["host_decoded"] for s in samples] == [0, 1, 1, 1]
    batch = collate_slots(samples, slot=(64, 64))
    assert batch.host_decoded == 3 and batch.slots is None
    slots = batch.decode_slots(torch.device("cpu"))
    assert torch.equal(slots, collate_slots(wants).slots)
    assert torch.equal(batch.boxes, collate_slots(wants).boxes)  # large.jpg's boxes scaled


@pytest.mark.parametrize(
    ("overrides", "device_type", "needle"),
    [
        (("data.augment_on=auto",), "cpu", "resolved to host on cpu"),
        (("data.augment_on=device",), "npu", "DVPP"),
        (("data.augment_on=device", "max_boxes=[8,16]"), "cuda", "buckets"),
    ],
)
def test_device_decode_where_it_cannot_run_says_why(overrides, device_type, needle):
    cfg = compose_cfg("data.decode=device", *overrides)
    with pytest.raises(ConfigError, match=needle):
        resolve_augment_on(cfg, Device(device_type, 0))


def test_device_counters_are_read_with_the_losses(tiny_cfg, tmp_path):
    """The boxes the device's crop and sanitising removed, and the crops no round decided, are
    counted on the device and summed into summary.json's data_counts (read one step late)."""
    from ssd_npu.data.device_augment import DeviceAugment

    on = (*FAST, "augment=true", "data.augment_on=device", "data.slot=[320,320]")
    t = build_training(tiny_cfg(*on))
    batch = next(iter(t.data.train))
    train_step(train_loop(t, tmp_path), batch, Progress())
    counts = t.step.device_counts()
    augment: DeviceAugment = t.step.augment
    out = augment(batch.slots, batch.sizes, batch.boxes, batch.labels, batch.valid, batch.draws)
    assert int(counts["augment_removed"]) == int(out.removed)
    assert int(counts["crop_undecided"]) == int(out.undecided)
    summary = run(tiny_cfg(*on, "max_steps=6", out=tmp_path / "run"))
    data = summary["data_counts"]
    assert {"augment_removed", "crop_undecided"} <= set(data)
    assert data["augment_removed"] >= 0 and data["crop_undecided"] >= 0
