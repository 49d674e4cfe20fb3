"""ssd-npu: fixed-shape detector training for shape-compiling devices (Ascend NPU, torch.compile).

The public API, for your own training loop (see the README, "Use the pieces in your own
training loop"):

    fixed_ssd_loss      the SSD loss with no data-dependent shape (= torchvision's values)
    FixedDetector       a torchvision SSD, RetinaNet or FCOS run on one fixed [B, 3, H, W] canvas
    FixedSSD            the same class under its first name (kept: user code imports it)
    build_detector      a torchvision detector (ssdlite320, ssd300, RetinaNet, FCOS), random init
    fit_to_canvas       one image + boxes onto the canvas (stretch | letterbox | pad)
    unfit_boxes         canvas boxes back to the original image
    pad_targets         boxes/labels to exactly M rows + a validity mask
    FixSample           the per-sample transform (fit + pad) for a Dataset
    FixedBatch          a batch of static shapes; collate_fixed stacks FixSample outputs
    find_dynamic_shapes record any step function and report the ops whose shapes change
    fixed_batched_nms   torchvision's batched_nms with static shapes: [B, K] indices + a mask
    SlotSample          the per-sample transform of augmentation on the device: image in a slot
    SlotBatch           a batch of slots; collate_slots stacks SlotSample outputs
    DeviceAugment       a batch of slots -> the augmented canvas batch, static shapes, on the device

Names are imported on first use, so that `import ssd_npu.data...` stays light (the training
input path never loads the model, the compiler or the tools).
"""

import importlib
import os
from typing import TYPE_CHECKING, Any

# torch >= 2.5 auto-imports an installed torch_npu during `import torch`, which fails on a
# host without CANN even for device=cpu. Importing ssd_npu before torch stops that;
# ssd_npu.device.backend imports torch_npu itself when device=npu asks for it.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

_API = {  # public name: the module that defines it
    "fixed_ssd_loss": "ssd_npu.loss.ssd",
    "FixedDetector": "ssd_npu.models.detector",
    "FixedSSD": "ssd_npu.models.detector",
    "build_detector": "ssd_npu.models.detector",
    "fit_to_canvas": "ssd_npu.data.fixed_shape",
    "unfit_boxes": "ssd_npu.data.fixed_shape",
    "pad_targets": "ssd_npu.data.fixed_shape",
    "FixSample": "ssd_npu.data.fixed_shape",
    "FixedBatch": "ssd_npu.data.fixed_shape",
    "collate_fixed": "ssd_npu.data.fixed_shape",
    "find_dynamic_shapes": "ssd_npu.tools.shapes",
    "fixed_batched_nms": "ssd_npu.models.nms",
    "SlotSample": "ssd_npu.data.slots",
    "SlotBatch": "ssd_npu.data.slots",
    "collate_slots": "ssd_npu.data.slots",
    "DeviceAugment": "ssd_npu.data.device_augment",
}

_RENAMED = {"FixedSSD": "FixedDetector"}

__all__ = [
    "DeviceAugment",
    "FixSample",
    "FixedBatch",
    "FixedDetector",
    "FixedSSD",
    "SlotBatch",
    "SlotSample",
    "build_detector",
    "collate_fixed",
    "collate_slots",
    "find_dynamic_shapes",
    "fixed_batched_nms",
    "fit_to_canvas",
    "fixed_ssd_loss",
    "pad_targets",
    "unfit_boxes",
]

if TYPE_CHECKING:
    from ssd_npu.data.device_augment import DeviceAugment
    from ssd_npu.data.fixed_shape import (
        FixedBatch,
        FixSample,
        collate_fixed,
        fit_to_canvas,
        pad_targets,
        unfit_boxes,
    )
    from ssd_npu.data.slots import SlotBatch, SlotSample, collate_slots
    from ssd_npu.loss.ssd import fixed_ssd_loss
    from ssd_npu.models.detector import FixedDetector, build_detector
    from ssd_npu.models.nms import fixed_batched_nms
    from ssd_npu.tools.shapes import find_dynamic_shapes

    FixedSSD = FixedDetector


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ssd_npu' has no attribute {name!r}")
    # FixedSSD predates RetinaNet and FCOS; it is FixedDetector under its first name
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
