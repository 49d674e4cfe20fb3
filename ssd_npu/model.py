"""torchvision's ssdlite320_mobilenet_v3_large, run on a fixed canvas.

In fixed mode the model's own `GeneralizedRCNNTransform` (per-image resize, a dynamic
shape) is skipped: the host has already put every image on the `[H, W]` canvas, so the
device runs normalise -> backbone -> head on one `[B, 3, H, W]` tensor. The anchors depend
only on the canvas, so they are computed once and kept as a buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from ssd_npu.errors import UserError


def build_detector(num_classes: int, canvas: tuple[int, int] = (320, 320)) -> SSD:
    """torchvision's SSDLite, random init (no download), its transform sized to `canvas`."""
    detector = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    height, width = canvas
    # GeneralizedRCNNTransform takes fixed_size as (W, H) and resizes to [H, W]; for the
    # dynamic baseline this makes torchvision stretch to the same canvas as the fixed path.
    detector.transform.fixed_size = (width, height)
    return detector


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
def canvas_anchors(detector: SSD, canvas: tuple[int, int]) -> Tensor:
    """Default boxes for a canvas: [A, 4] xyxy, canvas pixels (A = 3234 at 320x320).

    Runs the backbone once on zeros to get the feature-map sizes, in eval mode so the
    BatchNorm running statistics are not touched.
    """
    height, width = canvas
    with eval_mode(detector):
        zeros = torch.zeros(1, 3, height, width)
        features = list(detector.backbone(zeros).values())
        return detector.anchor_generator(ImageList(zeros, [(height, width)]), features)[0]


class FixedSSD(nn.Module):
    """SSDLite on a fixed canvas: images [B, 3, H, W] in [0, 1] -> head outputs.

    `detector` is the complete torchvision model, kept whole so that its state dict, its
    `postprocess_detections` and the `shape=dynamic` baseline all share the same weights.
    """

    def __init__(self, detector: SSD, canvas: tuple[int, int]):
        super().__init__()
        self.detector = detector
        self.canvas = tuple(canvas)
        self.register_buffer("anchors", canvas_anchors(detector, self.canvas), persistent=False)
        mean = torch.tensor(detector.transform.image_mean).view(3, 1, 1)
        std = torch.tensor(detector.transform.image_std).view(3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W] float in [0, 1] -> (cls_logits [B, A, C], bbox_regression [B, A, 4])."""
        x = (images - self.image_mean) / self.image_std
        features = list(self.detector.backbone(x).values())
        head = self.detector.head(features)
        return head["cls_logits"], head["bbox_regression"]


def load_weights(detector: SSD, path: str | Path) -> None:
    """Load a local checkpoint: ours ({"model": ...}) or a plain torchvision SSDLite state dict."""
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
        raise UserError(
            f"weights={path} does not fit ssdlite320 with data.num_classes="
            f"{detector.head.classification_head.num_columns}: {str(err).splitlines()[0]}"
        ) from err
