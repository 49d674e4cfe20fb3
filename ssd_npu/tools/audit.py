"""The app's shape audit: `find_dynamic_shapes` on the real training step of a config, or on
its evaluation forward.

`run_audit(cfg)` builds the pipeline exactly as train.py does (`build_training`, same
overrides) and records `audit.steps` real steps of the loop (`TrainLoop.run_step`: forward,
loss, backward, optimizer step) with `ssd_npu.tools.shapes.find_dynamic_shapes`; the loop's
own reads of the losses (`TrainLoop.finish`, made one step late and outside the step) are
recorded apart as logging syncs. Data loading and the copy to the device run unrecorded.

With `audit.target=eval` it records `audit.steps` val batches of the evaluation forward instead,
as `eval.postprocess` places it: `device` records the network and the fixed postprocess (what
stays on the device; the one copy of the [B, D, 7] result to the host is outside), `host`
records the network and torchvision's own `postprocess_detections` (what the host path runs,
data-dependent shapes and all).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import torch

from ssd_npu.build import Training, build_training
from ssd_npu.choices import AUDIT_TARGETS
from ssd_npu.config import TrainConfig
from ssd_npu.data.loader import Loaders
from ssd_npu.device.backend import Device
from ssd_npu.engine.loop import Progress, StepRecord, TrainLoop
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.evaluate import DeviceDetect, postprocess_fixed
from ssd_npu.models.detector import eval_mode
from ssd_npu.tools.shapes import ShapeReport, find_dynamic_shapes


class _DataProbe:
    """Iterates the train loader over epochs, batches already on the device; notes per batch
    the shapes the device would see unfixed."""

    def __init__(self, data: Loaders, device: Device) -> None:
        self.data, self.device, self.batches = data, device, []

    def __iter__(self) -> Iterator[Any]:
        for epoch in itertools.count():
            self.data.train_sampler.set_epoch(epoch)
            for batch in self.data.train:
                self.batches.append(self._shapes(batch))
                yield batch.to(self.device.torch)

    @staticmethod
    def _shapes(batch: Any) -> dict[str, Any]:
        if isinstance(getattr(batch, "images", None), list):  # DynamicBatch: torchvision's input
            sizes = [list(image.shape) for image in batch.images]
            boxes = [len(t["boxes"]) for t in batch.targets]
            return {"image_shapes": sizes, "boxes": boxes, "device": None}
        # FixedBatch / SlotBatch (data.augment_on=device: the image in its slot, augmented and
        # fitted inside the recorded step): the image and box count before fitting and padding
        slots = getattr(batch, "slots", None)
        sizes = batch.orig_sizes if slots is None else batch.sizes
        images = batch.images if slots is None else slots
        return {
            "image_shapes": [[3, *hw] for hw in sizes.tolist()],
            "boxes": batch.valid.sum(1).tolist(),
            "device": {"images": list(images.shape), "boxes": list(batch.boxes.shape)},
        }


def summarise_data(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Distinct image shapes and box counts over the recorded batches (and device shapes)."""
    shapes = sorted({tuple(s) for b in batches for s in b["image_shapes"]})
    boxes = sorted({n for b in batches for n in b["boxes"]})
    device = sorted({json.dumps(b["device"]) for b in batches if b["device"]})
    return {
        "images": sum(len(b["boxes"]) for b in batches),
        "distinct_image_shapes": len(shapes),
        "image_shapes": [list(s) for s in shapes[:10]],
        "distinct_box_counts": len(boxes),
        "box_counts": boxes,
        "device_batch_shapes": [json.loads(d) for d in device],
        "per_batch": batches,
    }


def _audit_info(cfg: TrainConfig, t: Training) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "shape": cfg.shape,
        "device": str(t.device.torch),
        "canvas": list(cfg.canvas),
        "batch_size": int(cfg.batch_size),
        "target": cfg.audit.target,
    }


def audit_eval(cfg: TrainConfig, t: Training, steps: int) -> ShapeReport:
    """Record `steps` val batches of the fixed path's evaluation forward (`eval.postprocess`:
    device = network + fixed postprocess; host or auto = network + torchvision's postprocess)."""
    if cfg.shape != "fixed":
        raise ConfigError("audit.target=eval audits the fixed path's evaluation: use shape=fixed.")
    if cfg.eval.postprocess == "device":
        detect = DeviceDetect(t.model, t.device, cfg.amp)

        def forward(images: Any) -> Any:
            return detect(images)
    else:

        def forward(images: Any) -> Any:
            with t.device.autocast(cfg.amp):
                head = t.model(images)
            return postprocess_fixed(t.model, *head)

    batches = (batch.images.to(t.device.torch) for batch in t.data.val)
    with eval_mode(t.model), torch.no_grad():
        report = find_dynamic_shapes(
            forward, itertools.islice(batches, steps), info=_audit_info(cfg, t)
        )
    report.info["postprocess"] = "device" if cfg.eval.postprocess == "device" else "host"
    return report


def run_audit(cfg: TrainConfig) -> ShapeReport:
    """Record `cfg.audit.steps` training steps (or val batches of the evaluation forward, with
    `audit.target=eval`) of the configured pipeline; return the report."""
    steps = int(cfg.audit.steps)
    if steps < 2:
        raise ConfigError(f"audit.steps={steps} is not valid; give an integer >= 2 to compare.")
    if cfg.audit.target not in AUDIT_TARGETS:
        raise ConfigError(
            f"audit.target={cfg.audit.target!r} is not valid; choose one of: {', '.join(AUDIT_TARGETS)}."
        )
    if cfg.compile:
        print("audit: compile=true ignored; the audit records the eager ops a compiler would get")
        cfg.compile = False
        cfg.compiler.optimizer = False  # it needs compile=true
    t = build_training(cfg)
    if cfg.audit.target == "eval":
        return audit_eval(cfg, t, steps)
    telemetry = Telemetry(cfg.out_dir, 0, enabled=False)
    loop = TrainLoop(
        t.step, t.optimizer, t.scheduler, t.data.train, None, t.device, telemetry, world=t.world
    )
    progress = Progress()
    probe = _DataProbe(t.data, t.device)

    def read(record: StepRecord) -> None:
        loop.finish(record, progress)

    report = find_dynamic_shapes(
        lambda batch: loop.run_step(batch, progress),
        itertools.islice(probe, steps),
        read=read,
        info=_audit_info(cfg, t),
    )
    report.info["data"] = summarise_data(probe.batches)
    return report
