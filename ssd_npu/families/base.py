"""What a detector family is: the interface every `ssd_npu/families/<name>.py` implements.

A family owns what differs between detectors: the names and order of its head's outputs, the
fixed loss (its options built from the model's spec; sums, then the normalisation), and the
fixed (device) and torchvision (host) postprocess. `FixedDetector`, the training step and
evaluation call these and never branch on a family's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from torch import Tensor

if TYPE_CHECKING:  # models/detector.py imports the families: only its type here
    from ssd_npu.models.detector import FixedDetector
    from ssd_npu.models.postprocess import Detections
    from ssd_npu.models.specs import EvalRecipe, ModelSpec, SGDRecipe

# The head's outputs in the family's order, each [B, A, ...] (e.g. cls_logits [B, A, C],
# bbox_regression [B, A, 4]); the same tuple FixedDetector.forward returns.
Head = tuple[Tensor, ...]
Levels = Sequence[int]  # anchors per feature level, [A_l, ...] summing to A
Sums = tuple[Tensor, ...]  # a fixed loss's sums, its foreground count last
# A count -> the same count over every rank (an all-reduce under torchrun, else identity)
Reduce = Callable[[Tensor], Tensor]


def identity(count: Tensor) -> Tensor:
    """The `Reduce` of one process."""
    return count


class Targets(NamedTuple):
    """A batch's padded ground truth on the canvas."""

    boxes: Tensor  # [B, M, 4] xyxy canvas px; padding rows may hold anything
    labels: Tensor  # [B, M] int64 logit columns
    valid: Tensor  # [B, M] bool, False on padding rows


class FixedLoss(Protocol):
    """A family's fixed-shape loss, options bound: `sums` is the part a step compiles (and DDP
    wraps); `normalise` runs after it, where a collective may be needed."""

    def sums(self, head: Head, anchors: Tensor, per_level: Levels, targets: Targets) -> Sums:
        """head (fp32), anchors [A, 4] xyxy canvas px, per_level [A_l, ...] summing to A ->
        the loss sums, then the foreground count; every shape fixed by B, A, C, M."""
        ...

    def normalise(self, sums: Sums, num_images: int, reduce: Reduce) -> dict[str, Tensor]:
        """`sums`' output -> the loss dict, torchvision's `compute_loss` keys and values;
        num_images: the global batch (B x world size); reduce: the count over every rank."""
        ...


class Family(Protocol):
    """One detector family (ssd, retinanet, fcos), registered in `ssd_npu.families.FAMILIES`."""

    name: str  # what `ModelSpec.family` says
    outputs: tuple[str, ...]  # the head dict's keys, in the order of `Head`
    eval_recipe: EvalRecipe  # the postprocess settings of torchvision's class (its defaults)
    train_recipe: str  # torchvision references/detection's augmentation (data.transforms)
    sgd_recipe: SGDRecipe  # references/detection's lr at a global batch, and weight decay

    def loss(self, spec: ModelSpec) -> FixedLoss:
        """The fixed loss with the options torchvision's builder gives `spec`'s detector."""
        ...

    def host_postprocess(self, model: FixedDetector, head: Head) -> list[dict[str, Tensor]]:
        """torchvision's own `postprocess_detections` on the host, in fp32: per image
        {"boxes" [N, 4] xyxy canvas px, "scores" [N], "labels" [N]} (N varies)."""
        ...

    def device_postprocess(self, model: FixedDetector, head: Head) -> Detections:
        """The same detections in fixed shapes ([B, D], D = detections_per_img)."""
        ...


def torchvision_postprocess(
    model: FixedDetector, outputs: tuple[str, ...], head: Head, per_level: bool
) -> list[dict[str, Tensor]]:
    """The detector's own `postprocess_detections` on the host, in fp32, on head outputs
    named `outputs`; `per_level`: split them and the anchors per feature level first, as
    `RetinaNet.forward` and `FCOS.forward` do (SSD takes them whole)."""
    anchors = model.anchors.detach().float().cpu()  # [A, 4] xyxy canvas px
    n = head[0].shape[0]
    tensors = {k: v.float().cpu() for k, v in zip(outputs, head, strict=True)}
    canvases = [model.canvas] * n
    if not per_level:
        return model.detector.postprocess_detections(tensors, [anchors] * n, canvases)
    split = list(model.anchors_per_level)
    levels = {k: list(v.split(split, dim=1)) for k, v in tensors.items()}
    return model.detector.postprocess_detections(levels, [list(anchors.split(split))] * n, canvases)
