"""Training augmentation: torchvision's `ssdlite` detection recipe in transforms v2.

Input and output: `(image, target)` with image `tv_tensors.Image` uint8 [3, h, w] and target
`boxes` `tv_tensors.BoundingBoxes` XYXY [N, 4] pixels, `labels` int64 [N]; other target keys
pass through. The image stays uint8 (the float conversion happens in the fit, after).
Randomness comes from torch's global generator (RandomIoUCrop calls torch.rand); the loader
seeds it per sample so results do not depend on the number of workers.
"""

from __future__ import annotations

from typing import Any

from torchvision.transforms import v2


def _labels(sample: Any) -> Any:
    """The labels of an `(image, target)` sample; a module function so workers can pickle it."""
    return sample[1]["labels"]


class SSDLiteAugmentation:
    """`RandomIoUCrop()` -> `RandomHorizontalFlip(0.5)` -> `SanitizeBoundingBoxes()`.

    RandomIoUCrop needs boxes: with none, no crop candidate passes its "a box centre lies in
    the crop" test, so it loops until it happens to draw the leave-as-is option (slow and
    random). Images with zero boxes therefore skip the crop and only get the flip.
    """

    def __init__(self) -> None:
        self.crop = v2.RandomIoUCrop()
        self.rest = v2.Compose(
            [v2.RandomHorizontalFlip(p=0.5), v2.SanitizeBoundingBoxes(labels_getter=_labels)]
        )
        self.full = v2.Compose([self.crop, self.rest])

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if target["boxes"].shape[0] == 0:
            return self.rest(image, target)
        return self.full(image, target)


def train_augmentation() -> SSDLiteAugmentation:
    """The ssdlite training augmentation (torchvision references/detection `ssdlite`)."""
    return SSDLiteAugmentation()


def eval_transform() -> None:
    """Evaluation uses no augmentation: the dataset's transforms stay None."""
    return None
