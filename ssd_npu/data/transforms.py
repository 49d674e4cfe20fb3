"""Training augmentation: torchvision's detection recipes, the IoU crop without its per-trial loop.

Each model trains with its own torchvision recipe (references/detection presets.py; the recipe
is named by `ModelSpec.recipe`): `ssdlite` (IoU crop, flip) for ssdlite320, `ssd`
(photometric distortion, zoom-out with the mean as fill, IoU crop, flip) for ssd300_vgg16,
`hflip` (flip only) for RetinaNet; `train_augmentation(recipe)` builds one.

torchvision's references build it as `RandomIoUCrop()` -> `RandomHorizontalFlip(0.5)` ->
`SanitizeBoundingBoxes()` (transforms v2). Here the crop is drawn by `IoUCropSampler` (the
same tests and the same distribution of crops, all trials of a round at once) and the rest
is applied directly, with torchvision's arithmetic for the boxes: on the same crop and flip
the image and boxes are exactly what the v2 transforms give.

Input and output: `(image, target)`. image: `tv_tensors.Image` uint8 [3, h, w] (the crop is a
view; only a flipped crop is copied) or a `DeferredImage` (data.decode=reduced: the crop and
flip are recorded, the fit decodes). target: `boxes` `tv_tensors.BoundingBoxes` XYXY [N, 4]
pixels, `labels` int64 [N]; other keys pass through. The image stays uint8 (the float
conversion happens in the fit, after). Randomness comes from torch's global generator, as in
torchvision; the loader seeds it per sample so results do not depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssd_npu.data.decode import DeferredImage
from ssd_npu.data.iou_crop import CropParams, IoUCropSampler, crop_boxes, hflip_boxes, sanitize

CropSampler = Callable[[np.ndarray, tuple[int, int]], CropParams | None]


class SSDLiteAugmentation:
    """[before] -> IoU crop -> horizontal flip (p = 0.5) -> drop boxes under 1 px, as
    torchvision's ssdlite (no `before`), ssd (`before`: photometric distortion and zoom-out, as
    torchvision's v2 transforms) and hflip (`crop=False`) recipes.

    RandomIoUCrop needs boxes: with none, no crop candidate passes its "a box centre lies in
    the crop" test, so torchvision loops until it happens to draw the leave-as-is option (slow
    and random). Images with zero boxes therefore skip the crop and only get the flip.
    """

    def __init__(
        self,
        crop: CropSampler | None | bool = None,
        flip_p: float = 0.5,
        before: Callable[..., Any] | None = None,
    ) -> None:
        # any (boxes [N, 4] f32, (h, w)) -> crop or None; None: IoUCropSampler(); False: no crop
        self.crop = None if crop is False else (crop or IoUCropSampler())
        self.flip_p, self.before = flip_p, before

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self.before is not None:  # v2 transforms on (Image, {"boxes": BoundingBoxes, ...})
            image, target = self.before(image, target)
        boxes = target["boxes"].as_subclass(Tensor).numpy()  # float32 [N, 4], numpy: few boxes
        labels = target["labels"]
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if boxes.shape[0] > 0 and self.crop is not None:
            params = self.crop(boxes, (h, w))
            if params is not None:
                image = _crop(image, params.top, params.left, params.height, params.width)
                boxes = crop_boxes(boxes, params)
                h, w = params.height, params.width
        # v2's RandomHorizontalFlip: one torch.rand(1) per sample, flip when below p
        if torch.rand(1) < self.flip_p:
            image = image.hflip() if isinstance(image, DeferredImage) else _hflip(image)
            boxes = hflip_boxes(boxes, w)
        keep = sanitize(boxes, (h, w))
        out = dict(target)
        out["boxes"] = tv_tensors.BoundingBoxes(
            torch.from_numpy(boxes[keep]), format="XYXY", canvas_size=(h, w)
        )
        out["labels"] = labels[torch.from_numpy(keep)]
        if isinstance(image, Tensor) and not isinstance(image, tv_tensors.Image):
            image = tv_tensors.Image(image)
        return image, out


def _crop(image: Any, top: int, left: int, height: int, width: int) -> Any:
    if isinstance(image, DeferredImage):
        return image.crop(top, left, height, width)
    return image[..., top : top + height, left : left + width]  # a view, as v2's crop


def _hflip(image: Tensor) -> Tensor:
    """image[..., ::-1] as a new tensor in the memory order of the input (channels-last stays
    channels-last: the fit then converts it without a transposing copy)."""
    if image.dim() == 3 and image.stride(0) == 1:  # [3, h, w] over [h, w, 3] memory
        return image.permute(1, 2, 0).flip(1).permute(2, 0, 1)
    return image.flip(-1)


# torchvision references/detection: the mean fill of the ssd recipe's zoom-out (uint8 pixels)
SSD_MEAN = (123.0, 117.0, 104.0)
RECIPES = ("ssdlite", "ssd", "hflip")


def train_augmentation(recipe: str = "ssdlite") -> SSDLiteAugmentation:
    """A model's training augmentation (torchvision references/detection presets.py)."""
    if recipe == "ssdlite":
        return SSDLiteAugmentation()
    if recipe == "hflip":
        return SSDLiteAugmentation(crop=False)
    if recipe == "ssd":
        before = v2.Compose([v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=list(SSD_MEAN))])
        return SSDLiteAugmentation(before=before)
    raise ValueError(f"recipe={recipe!r} is not valid; choose one of: {', '.join(RECIPES)}")
