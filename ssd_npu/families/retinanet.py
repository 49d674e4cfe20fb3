"""The RetinaNet family (retinanet_resnet50_fpn, _v2): `RetinaNet.compute_loss` and
`RetinaNet.postprocess_detections` in fixed shapes.

Head: cls_logits [B, A, C] (no background column), bbox_regression [B, A, 4]. Loss
(`ssd_npu.loss.retinanet`): sigmoid focal + the spec's box loss ("l1" v1, "giou" v2), each
image over its own foreground anchors, then the mean over the global batch. Postprocess:
per FPN level, split as `RetinaNet.forward` splits it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ssd_npu.families.base import Head, Levels, Reduce, Sums, Targets, torchvision_postprocess
from ssd_npu.loss.retinanet import RetinaNetLossOptions, retinanet_loss_sums, retinanet_normalise
from ssd_npu.models.postprocess import Detections, recipe_of, retinanet_postprocess
from ssd_npu.models.specs import EvalRecipe, SGDRecipe

if TYPE_CHECKING:
    from ssd_npu.models.detector import FixedDetector
    from ssd_npu.models.specs import ModelSpec


@dataclass(frozen=True)
class RetinaNetLoss:
    """`retinanet_loss_sums` -> (box-loss sums [B], focal sums [B], foreground anchors [B]);
    each image over its own count (local: no collective), the sum over the global batch."""

    options: RetinaNetLossOptions = field(default_factory=RetinaNetLossOptions)

    def sums(self, head: Head, anchors: Tensor, per_level: Levels, targets: Targets) -> Sums:
        # labels are logit columns as given (COCO ids; column 0 never a target)
        return retinanet_loss_sums(*head, anchors, *targets, self.options)

    def normalise(self, sums: Sums, num_images: int, reduce: Reduce) -> dict[str, Tensor]:
        # per image over its own count: local, no collective
        return retinanet_normalise(*sums, num_images=num_images)


class RetinaNetFamily:
    name = "retinanet"
    outputs = ("cls_logits", "bbox_regression")
    eval_recipe = EvalRecipe(0.05, 0.5, 300, 1000)  # `RetinaNet`'s defaults
    train_recipe = "hflip"
    sgd_recipe = SGDRecipe(0.01, 16, 1e-4)  # --lr 0.01, 8 GPUs x 2 images, default decay

    def loss(self, spec: ModelSpec) -> RetinaNetLoss:
        # a spec that names no box loss type: torchvision's RetinaNet default
        return RetinaNetLoss(RetinaNetLossOptions(bbox_reg_loss_type=spec.box_loss_type or "l1"))

    def host_postprocess(self, model: FixedDetector, head: Head) -> list[dict[str, Tensor]]:
        return torchvision_postprocess(model, self.outputs, head, per_level=True)

    def device_postprocess(self, model: FixedDetector, head: Head) -> Detections:
        # per level, as RetinaNet.forward splits them
        anchors = (model.anchors, model.anchors_per_level)
        coder, recipe = model.detector.box_coder, recipe_of(model.detector)
        return retinanet_postprocess(*head, *anchors, model.canvas, coder, recipe)


RETINANET = RetinaNetFamily()
