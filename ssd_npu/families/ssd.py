"""The SSD family (ssdlite320_mobilenet_v3_large, ssd300_vgg16): `SSD.compute_loss` and
`SSD.postprocess_detections` in fixed shapes.

Head: cls_logits [B, A, C] (column 0 background), bbox_regression [B, A, 4]. Loss
(`ssd_npu.loss.ssd`): Smooth-L1 + softmax CE with 3:1 hard negatives, both over the foreground
anchors of the (global) batch. Postprocess: softmax over all anchors at once (no split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ssd_npu.families.base import Head, Levels, Reduce, Sums, Targets, torchvision_postprocess
from ssd_npu.loss.ssd import SSDLossOptions, normalise, ssd_loss_sums
from ssd_npu.models.postprocess import Detections, recipe_of, ssd_postprocess
from ssd_npu.models.specs import EvalRecipe, SGDRecipe

if TYPE_CHECKING:
    from ssd_npu.models.detector import FixedDetector
    from ssd_npu.models.specs import ModelSpec


@dataclass(frozen=True)
class SSDLoss:
    """`ssd_loss_sums` -> (Smooth-L1 sum, CE sum, foreground anchors), scalars over the batch;
    normalised by the foreground count of the global batch."""

    options: SSDLossOptions = field(default_factory=SSDLossOptions)

    def sums(self, head: Head, anchors: Tensor, per_level: Levels, targets: Targets) -> Sums:
        return ssd_loss_sums(*head, anchors, *targets, self.options)

    def normalise(self, sums: Sums, num_images: int, reduce: Reduce) -> dict[str, Tensor]:
        bbox_sum, cls_sum, num_foreground = sums
        return normalise(bbox_sum, cls_sum, reduce(num_foreground))


class SSDFamily:
    name = "ssd"
    outputs = ("cls_logits", "bbox_regression")
    eval_recipe = EvalRecipe(0.01, 0.45, 200, 400)  # `SSD`'s defaults, ssd300's
    train_recipe = "ssd"  # ssd300's; ssdlite320 names its own
    sgd_recipe = SGDRecipe(0.002, 32, 5e-4)  # ssd300's (--lr 0.002 --batch-size 4, 8 GPUs)

    def loss(self, spec: ModelSpec) -> SSDLoss:
        return SSDLoss()  # every SSD takes torchvision's own options

    def host_postprocess(self, model: FixedDetector, head: Head) -> list[dict[str, Tensor]]:
        return torchvision_postprocess(model, self.outputs, head, per_level=False)

    def device_postprocess(self, model: FixedDetector, head: Head) -> Detections:
        detector = model.detector
        recipe = recipe_of(detector)
        return ssd_postprocess(*head, model.anchors, model.canvas, detector.box_coder, recipe)


SSD = SSDFamily()
