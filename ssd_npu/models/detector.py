"""torchvision detectors (SSDLite, SSD300, RetinaNet, FCOS) run on a fixed canvas.

In fixed mode the model's own `GeneralizedRCNNTransform` (per-image resize, a dynamic
shape) is skipped: the host has already put every image on the `[H, W]` canvas, so the
device runs normalise -> backbone -> head on one `[B, 3, H, W]` tensor. The anchors depend
only on the canvas, so they are computed once and kept as a buffer. Which torchvision
builder, family and canvas rule belong to a `model=` name: `ssd_npu.models.specs`; what a
family's head returns, its loss and postprocess: `ssd_npu.families`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection.image_list import ImageList

from ssd_npu.choices import Canvas
from ssd_npu.errors import UserError
from ssd_npu.families import Family, Head, family_of
from ssd_npu.models.specs import DEFAULT_MODEL, MODELS, ModelSpec, model_spec

# SSD, RetinaNet or FCOS: each has backbone, head (a dict of its family's outputs),
# anchor_generator, transform and postprocess_detections.
Detector = nn.Module


def build_detector(
    num_classes: int, canvas: tuple[int, int] = (320, 320), name: str = DEFAULT_MODEL
) -> Detector:
    """torchvision's detector `name`, random init (no download), its transform sized to `canvas`.

    `weights=None, weights_backbone=None`: nothing is downloaded, and RetinaNet's ResNet then
    uses trainable BatchNorm2d (FrozenBatchNorm2d only comes with pretrained weights).
    """
    spec = model_spec(name)
    builder = getattr(detection, spec.name)
    detector = builder(weights=None, weights_backbone=None, num_classes=num_classes)
    height, width = canvas
    # GeneralizedRCNNTransform takes fixed_size as (W, H) and resizes to [H, W]; for the
    # dynamic baseline this makes torchvision stretch to the same canvas as the fixed path
    # (RetinaNet's min_size 800 / max_size 1333 keep-aspect resize is then not used; its
    # size_divisible=32 pads nothing on a canvas that follows its rule).
    detector.transform.fixed_size = (width, height)
    detector.transform.min_size = (min(canvas),)
    detector.transform.max_size = max(canvas)
    detector.model_name = spec.name  # a plain attribute: the state dict is torchvision's
    return detector


def detector_spec(detector: Detector) -> ModelSpec:
    """The spec of the detector's `model_name` (set by `build_detector`).

    A torchvision SSD built elsewhere, without the name, is taken as the default model (all
    SSDs share one loss); any other unnamed detector raises ValueError: its loss options (a
    RetinaNet's box loss type) cannot be told from its class.
    """
    name = getattr(detector, "model_name", None)
    if name is None:
        if not isinstance(detector, detection.ssd.SSD):
            raise ValueError(
                f"{type(detector).__name__} has no model_name: build it with build_detector, "
                f"or set detector.model_name to one of: {', '.join(MODELS)}."
            )
        name = DEFAULT_MODEL
    return model_spec(name)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block, then back in the mode it had (train or eval)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def canvas_anchors_per_level(
    detector: Detector, canvas: tuple[int, int]
) -> tuple[Tensor, list[int]]:
    """The detector's own anchors for a canvas and how many belong to each feature level.

    Returns anchors [A, 4] xyxy canvas pixels (A = 3234 for ssdlite at 320x320, 8732 for
    ssd300 at 300x300, 49104 for RetinaNet and 5456 for FCOS at 512x512) and [A_level, ...]
    summing to A (the split RetinaNet's and FCOS's postprocess and FCOS's size ranges need:
    feature h x w x anchors per location, the generator's own count per level). Runs the
    backbone once on zeros, in eval mode so BatchNorm running statistics are not touched.
    """
    height, width = canvas
    with eval_mode(detector):
        weight = next(detector.parameters())  # the detector's own dtype and device
        zeros = torch.zeros(1, 3, height, width, dtype=weight.dtype, device=weight.device)
        features = list(detector.backbone(zeros).values())
        anchors = detector.anchor_generator(ImageList(zeros, [(height, width)]), features)[0]
    cells = [f.shape[-2] * f.shape[-1] for f in features]
    # AnchorGenerator (RetinaNet: 9, FCOS: 1) and DefaultBoxGenerator (SSD: 4 or 6) both say
    # how many anchors each location of each level has
    counts = detector.anchor_generator.num_anchors_per_location()
    return anchors, [c * k for c, k in zip(cells, counts, strict=True)]


def canvas_anchors(detector: Detector, canvas: tuple[int, int]) -> Tensor:
    """Anchors for a canvas: [A, 4] xyxy, canvas pixels (A = 3234 for ssdlite at 320x320)."""
    return canvas_anchors_per_level(detector, canvas)[0]


class FixedDetector(nn.Module):
    """A detector on a fixed canvas: images [B, 3, H, W] in [0, 1] -> its head's outputs.

    `detector` is the complete torchvision model, kept whole so that its state dict, its
    `postprocess_detections` and the `shape=dynamic` baseline all share the same weights.
    Normalisation is the detector's own (`GeneralizedRCNNTransform.normalize`): ssdlite
    (x - 0.5) / 0.5; ssd300 (x - [0.48235, 0.45882, 0.40784]) / (1/255), i.e. 0..255 pixels
    minus the VGG mean; RetinaNet and FCOS ImageNet mean/std. `family` (from the spec) names
    the head's outputs and owns the loss and postprocess.
    """

    def __init__(self, detector: Detector, canvas: tuple[int, int]):
        super().__init__()
        self.detector = detector
        self.canvas = Canvas.of(canvas)  # (H, W) ints, whatever pair was given
        self.spec = detector_spec(detector)  # family, box loss, eval recipe
        self.family: Family = family_of(self.spec.family)
        anchors, self.anchors_per_level = canvas_anchors_per_level(detector, self.canvas)
        self.register_buffer("anchors", anchors, persistent=False)
        dtype = anchors.dtype  # the detector's (float64 for a .double() detector: exact mean)
        mean = torch.tensor(detector.transform.image_mean, dtype=dtype).view(3, 1, 1)
        std = torch.tensor(detector.transform.image_std, dtype=dtype).view(3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

    def forward(self, images: Tensor) -> Head:
        """images [B, 3, H, W] float in [0, 1], or uint8 0..255 (data.decode=reduced: a quarter
        of the bytes to copy, scaled here on the device) -> the head's outputs in the family's
        order (`family.outputs`): (cls_logits [B, A, C], bbox_regression [B, A, 4]) for SSD and
        RetinaNet, and bbox_ctrness [B, A, 1] third for FCOS."""
        if images.dtype == torch.uint8:  # to_dtype's arithmetic, as the host's float path
            images = images.to(torch.float32).mul_(1.0 / 255)
        x = (images - self.image_mean) / self.image_std
        features = list(self.detector.backbone(x).values())
        head = self.detector.head(features)
        return tuple(head[name] for name in self.family.outputs)


def num_classes_of(detector: Detector) -> int:
    """Logit columns of the classification head (background included for SSD)."""
    head = detector.head.classification_head
    return int(getattr(head, "num_columns", None) or head.num_classes)


def load_weights(detector: Detector, path: str | Path) -> None:
    """Load a local checkpoint: ours ({"model": ...}) or a plain torchvision state dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights={path}: no such file; give the path of a local checkpoint.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise UserError(f"weights={path}: cannot be read as a PyTorch checkpoint ({err}).") from err
    state = state.get("model", state)
    state = {k.removeprefix("detector."): v for k, v in state.items()}
    try:
        detector.load_state_dict(state)
    except RuntimeError as err:
        name = getattr(detector, "model_name", type(detector).__name__)
        raise UserError(
            f"weights={path} does not fit model={name} with data.num_classes="
            f"{num_classes_of(detector)}: {str(err).splitlines()[0]}"
        ) from err
