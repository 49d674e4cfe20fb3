"""data.augment_on=device as a whole: the slot batches, the step that augments and fits them,
the run (same seed, resume, recipes per model), against the host pipeline it replaces."""

from __future__ import annotations

import pytest
import torch

from ssd_npu.build import build_training, resolve_augment_on
from ssd_npu.config import ConfigError
from ssd_npu.data.slots import SlotBatch
from ssd_npu.engine import Progress
from ssd_npu.train import run
from tests.helpers import FAST, compose_cfg, losses, train_loop, train_step

# Larger than every image of the tiny set: nothing is scaled down on the host, so the device
# fit sees the very pixels the host fit does.
WIDE_SLOT = "data.slot=[2048,2048]"


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
    assert resolve_augment_on(compose_cfg(*overrides), device_type) == want


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("max_boxes=[8,16]",), "buckets"),
    ],
)
def test_device_where_it_does_not_apply_says_why(overrides, needle):
    cfg = compose_cfg("data.augment_on=device", *overrides)
    with pytest.raises(ConfigError, match=needle) as err:
        resolve_augment_on(cfg, "cuda")
    assert "data.augment_on=host" in str(err.value)
