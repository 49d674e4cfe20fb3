"""The detectors `model=` can name: torchvision builder, family, box loss, eval recipe,
default canvas, canvas rule, training augmentation recipe.

Light on purpose (no torch import): the config check reads the canvas rules from here before
anything is built. `ssd_npu.models.detector` builds what a spec names.

Canvas rules (checked against torchvision 0.29):
- ssdlite320_mobilenet_v3_large: the backbone halves the resolution five times before its
  extra blocks, so each side must be divisible by 32 (every feature map, and the anchor grid,
  then has an integer size); torchvision's own canvas is 320x320.
- ssd300_vgg16: exactly 300x300. Its `DefaultBoxGenerator(steps=[8, 16, 32, 64, 100, 300])`
  places anchor centres at fixed pixel strides that only tile a 300 px canvas, and the
  builder ignores any other `size` ("The size of the model is already fixed").
- retinanet_resnet50_fpn(_v2), fcos_resnet50_fpn: `GeneralizedRCNNTransform(size_divisible=32)` pads every batch
  to multiples of 32, so a canvas divisible by 32 is exactly what torchvision's own path sees
  (nothing padded); FPN levels P3-P7, strides 8..128.

Training recipes: torchvision's references/detection README trains ssdlite320 with `ssdlite`
(IoU crop, flip), ssd300_vgg16 with `ssd` (photometric distortion, zoom-out, IoU crop, flip)
and RetinaNet and FCOS with the default `hflip`; its SGD (8 GPUs, momentum 0.9): ssdlite320
lr 0.15 at global batch 192, weight decay 4e-5; ssd300_vgg16 0.002 at 32, 5e-4; RetinaNet and
FCOS 0.01 at 16 (train.py's default --batch-size 2), 1e-4 (its default weight decay).

Family: which module of `ssd_npu.families` owns the head outputs, the fixed loss and the
postprocess (`ssd`, `retinanet`, `fcos`); named here as a string so this module stays light.

Box loss and eval recipe: what each torchvision builder sets (0.29): retinanet_resnet50_fpn
keeps `RetinaNetRegressionHead._loss_type = "l1"`, retinanet_resnet50_fpn_v2 sets "giou";
ssdlite320 passes its own postprocess defaults (score 0.001, NMS 0.55, 300 detections, top
300); the others keep their family's class defaults (`ssd_npu.families`: `SSD`'s, `RetinaNet`'s,
`FCOS`'s), as they keep its training recipe (ssd, hflip, hflip) unless named here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalRecipe:
    """The detector's postprocess settings, as its torchvision builder sets them (the
    attributes of the same names on the built detector)."""

    score_thresh: float  # drop detections scoring below
    nms_thresh: float  # IoU above which NMS suppresses
    detections_per_img: int  # kept per image after NMS
    topk_candidates: int  # best-scoring candidates kept before NMS (per level: RetinaNet, FCOS)


# ssdlite320's builder passes its own postprocess settings (the SSD family's are `SSD`'s)
SSDLITE_RECIPE = EvalRecipe(0.001, 0.55, 300, 300)


@dataclass(frozen=True)
class SGDRecipe:
    """The SGD of torchvision's references/detection README for a model (8 GPUs): the lr at
    a global batch, which `optim.lr=null` scales linearly to the run's global batch, and the
    weight decay. Momentum 0.9 for all."""

    lr: float  # at `batch`
    batch: int  # global batch (8 GPUs x the README's --batch-size; train.py's default is 2)
    weight_decay: float


# ssdlite320: --lr 0.15 --batch-size 24 --weight-decay 0.00004 (the SSD family's is ssd300's)
SSDLITE_SGD = SGDRecipe(0.15, 192, 4e-5)


@dataclass(frozen=True)
class ModelSpec:
    """One detector: its torchvision builder name, family, box loss, default canvas (H, W),
    canvas rule, and where they differ from its family's defaults (`ssd_npu.families`), its
    eval recipe and training augmentation recipe (`eval_recipe_of`, `train_recipe_of`)."""

    name: str  # torchvision.models.detection builder, e.g. "ssd300_vgg16"
    family: str  # a key of ssd_npu.families.FAMILIES: "ssd" | "retinanet" | "fcos"
    canvas: tuple[int, int]  # default [H, W] pixels
    # RetinaNet's bbox_reg_loss_type ("l1" | "giou"); None for SSD and FCOS (fixed box losses)
    box_loss_type: str | None = None
    divisor: int = 32  # each side divisible by this
    min_side: int = 64  # each side at least this, pixels
    exact: tuple[int, int] | None = None  # the only canvas allowed, when the anchors demand it
    # the postprocess settings its builder sets; None: its family's class defaults
    eval_recipe: EvalRecipe | None = None
    # torchvision references/detection's training augmentation for it (ssd_npu.data.transforms);
    # None: its family's
    recipe: str | None = None
    # references/detection's SGD for it (lr at a global batch, weight decay); None: its family's
    sgd: SGDRecipe | None = None

    @property
    def canvas_rule(self) -> str:
        """The rule in words, for error messages and the README."""
        if self.exact is not None:
            return f"exactly {list(self.exact)} (its anchors are tied to that size)"
        return f"two integers [H,W], each >= {self.min_side} and divisible by {self.divisor}"

    def canvas_ok(self, canvas: list) -> bool:
        """True when `canvas` ([H, W] ints) follows this model's rule."""
        if len(canvas) != 2 or any(not isinstance(v, int) or isinstance(v, bool) for v in canvas):
            return False
        if self.exact is not None:
            return tuple(canvas) == tuple(self.exact)
        return all(v >= self.min_side and v % self.divisor == 0 for v in canvas)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # ssdlite320: its builder's own postprocess settings, its own augmentation recipe
        ModelSpec(
            "ssdlite320_mobilenet_v3_large",
            "ssd",
            (320, 320),
            eval_recipe=SSDLITE_RECIPE,
            recipe="ssdlite",
            sgd=SSDLITE_SGD,
        ),
        ModelSpec("ssd300_vgg16", "ssd", (300, 300), exact=(300, 300)),
        # RetinaNet: its box loss type (torchvision's `_loss_type`)
        ModelSpec("retinanet_resnet50_fpn", "retinanet", (512, 512), "l1"),
        ModelSpec("retinanet_resnet50_fpn_v2", "retinanet", (512, 512), "giou"),
        # FCOS: GIoU box loss and centerness are fixed
        ModelSpec("fcos_resnet50_fpn", "fcos", (512, 512)),
    )
}
DEFAULT_MODEL = "ssdlite320_mobilenet_v3_large"


def model_spec(name: str) -> ModelSpec:
    """The spec of `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"model={name!r} is not valid; choose one of: {', '.join(MODELS)}."
        ) from None
