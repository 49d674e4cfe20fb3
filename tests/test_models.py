"""model=: SSD300, RetinaNet and FCOS on the same fixed pipeline as SSDLite.

Per model: its own anchors per canvas, a fixed step with 0 dynamic ops and 0 host syncs,
the canvas rule; RetinaNet and FCOS: a few SGD steps equal torchvision's own
`detector(images, targets)`; compiled, one graph over varied batches (slow). Canvases and
batches are tiny.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.ssd import SSD

from ssd_npu import find_dynamic_shapes
from ssd_npu.config import validate
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.device.backend import Device
from ssd_npu.device.compiler import CompileOptions, reset
from ssd_npu.device.distributed import World
from ssd_npu.engine.train_step import FixedStep, StepOptions
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.evaluate import postprocess_fixed
from ssd_npu.families import eval_recipe_of, train_recipe_of
from ssd_npu.models.detector import FixedDetector, build_detector, canvas_anchors, detector_spec
from ssd_npu.models.specs import DEFAULT_MODEL, MODELS, EvalRecipe
from ssd_npu.tools.data_report import data_report, smallest_anchor
from tests.helpers import compose_cfg

NUM_CLASSES = 6
CPU = Device("cpu", None)

# (model, canvas, anchors): the default canvas of each model, and a small one where allowed
ANCHORS = [
    ("ssdlite320_mobilenet_v3_large", (320, 320), 3234),
    ("ssdlite320_mobilenet_v3_large", (128, 128), 522),
    ("ssd300_vgg16", (300, 300), 8732),
    ("retinanet_resnet50_fpn", (512, 512), 49104),  # 9 x (64^2 + 32^2 + 16^2 + 8^2 + 4^2)
    ("retinanet_resnet50_fpn", (128, 128), 3069),
    ("retinanet_resnet50_fpn_v2", (128, 96), 2313),  # 9 x (16x12 + 8x6 + 4x3 + 2x2 + 1x1)
    ("fcos_resnet50_fpn", (512, 512), 5456),  # 1 x (64^2 + 32^2 + 16^2 + 8^2 + 4^2)
    ("fcos_resnet50_fpn", (128, 96), 257),  # 16x12 + 8x6 + 4x3 + 2x2 + 1x1
]


@pytest.mark.parametrize(("name", "canvas", "count"), ANCHORS)
def test_anchors_follow_the_model_and_canvas(name, canvas, count):
    model = FixedDetector(build_detector(NUM_CLASSES, canvas, name), canvas)
    assert model.anchors.shape == (count, 4) and sum(model.anchors_per_level) == count
    torch.testing.assert_close(model.anchors, canvas_anchors(model.detector, canvas))
    with torch.no_grad():
        cls_logits, bbox_regression, *ctrness = model.eval()(torch.rand(1, 3, *canvas))
    assert cls_logits.shape == (1, count, NUM_CLASSES) and bbox_regression.shape == (1, count, 4)
    # FCOS's third output, in the family's order
    assert [c.shape for c in ctrness] == [(1, count, 1)] * (len(model.family.outputs) - 2)
    # the dynamic baseline puts images on the same canvas
    assert model.detector.transform.fixed_size == (canvas[1], canvas[0])


def test_model_config_sets_the_canvas_and_its_rule():
    cfg = compose_cfg("model=ssd300_vgg16")
    validate(cfg)
    assert cfg.model.name == "ssd300_vgg16" and list(cfg.canvas) == [300, 300]
    cfg = compose_cfg("model=retinanet_resnet50_fpn", "canvas=[256,256]")
    validate(cfg)
    assert list(cfg.canvas) == [256, 256] and cfg.model.canvas == [512, 512]
    with pytest.raises(
        ConfigError, match=r"canvas=\[320, 320\].*ssd300_vgg16.*exactly \[300, 300\]"
    ):
        validate(compose_cfg("model=ssd300_vgg16", "canvas=[320,320]"))
    with pytest.raises(ConfigError, match=r"canvas=\[100, 128\].*divisible by 32"):
        validate(compose_cfg("model=retinanet_resnet50_fpn", "canvas=[100,128]"))
    with pytest.raises(ConfigError, match="model='foo'.*ssd300_vgg16.*retinanet_resnet50_fpn"):
        validate(compose_cfg("model.name=foo"))


def make_batch(seed: int, canvas: tuple[int, int], batch: int, counts: list[int]) -> FixedBatch:
    """Random images on the canvas; counts[i] valid boxes (xyxy canvas px) in M = 6 rows."""
    g = torch.Generator().manual_seed(seed)
    h, w = canvas
    m = 6
    xy = torch.rand(batch, m, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 8 + torch.rand(batch, m, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
    valid = torch.arange(m)[None] < torch.tensor(counts)[:, None]
    return FixedBatch(
        images=torch.rand(batch, 3, h, w, generator=g),
        boxes=torch.cat([xy, xy + wh], -1),
        labels=torch.randint(1, NUM_CLASSES, (batch, m), generator=g),
        valid=valid,
        image_ids=torch.arange(batch),
        orig_sizes=torch.tensor([[h, w]] * batch),
        content_sizes=torch.tensor([[h, w]] * batch),
        scales=torch.ones(batch, 2),
    )


@pytest.mark.parametrize(
    ("name", "canvas"),
    [
        # slow (~9 s, VGG at 300 px): ssdlite's step (the same SSD loss) is audited quickly
        # in test_train.py and test_audit.py
        pytest.param("ssd300_vgg16", (300, 300), marks=pytest.mark.slow),
        ("retinanet_resnet50_fpn", (128, 128)),
        ("retinanet_resnet50_fpn_v2", (128, 128)),
        ("fcos_resnet50_fpn", (128, 128)),
    ],
)
def test_fixed_step_has_no_dynamic_shape_and_no_host_sync(name, canvas):
    torch.manual_seed(0)
    model = FixedDetector(build_detector(NUM_CLASSES, canvas, name), canvas)
    model.train()
    step = FixedStep(model, CPU)

    def train_step(batch):
        model.zero_grad(set_to_none=True)
        losses = step(batch)
        sum(losses.values()).backward()
        return losses

    batches = [make_batch(i, canvas, 1, [n]) for i, n in enumerate((0, 2, 6))]
    report = find_dynamic_shapes(train_step, batches)
    assert report.dynamic_ops == [] and report.host_syncs == [], str(report)
    # and the detections come from the detector's own postprocess, on the host
    with torch.no_grad():
        model.eval()
        detections = postprocess_fixed(model, *model(batches[0].images))
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def to_targets(batch: FixedBatch) -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": b[v], "labels": lab[v]}
        for b, lab, v in zip(batch.boxes, batch.labels, batch.valid, strict=True)
    ]


@pytest.mark.parametrize(
    "name",
    # v2 slow (~6 s): its GIoU box loss equals torchvision's in test_retinanet_loss.py
    [
        "retinanet_resnet50_fpn",
        pytest.param("retinanet_resnet50_fpn_v2", marks=pytest.mark.slow),
        "fcos_resnet50_fpn",
    ],
)
def test_fixed_training_equals_torchvision_training(name):
    """3 SGD steps: FixedStep and torchvision's own RetinaNet / FCOS give the same loss per
    step (every key of torchvision's loss dict: FCOS adds bbox_ctrness).

    The images are already on the canvas, so torchvision's resize (fixed_size = the canvas)
    and its size_divisible=32 padding are exact copies: the inputs are the same. float64:
    training-mode BatchNorm over batch 2 on a random ResNet turns float32 rounding (~1e-5
    relative in the first step's gradients) into percent-level loss differences by step 3.
    """
    canvas = (64, 96)
    torch.manual_seed(0)
    reference = build_detector(NUM_CLASSES, canvas, name).double()
    fixed = FixedDetector(copy.deepcopy(reference), canvas)
    assert fixed.anchors.dtype == fixed.image_mean.dtype == torch.float64
    reference.train()
    fixed.train()
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    opt_fix = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9)
    step = FixedStep(fixed, CPU)
    for i, counts in enumerate(([3, 0], [6, 1], [2, 5])):
        batch = make_batch(10 + i, canvas, 2, counts)
        batch.images, batch.boxes = batch.images.double(), batch.boxes.double()
        ref_losses = reference(list(batch.images), to_targets(batch))
        fix_losses = step(batch)
        assert fix_losses.keys() == ref_losses.keys()
        for key in ref_losses:
            torch.testing.assert_close(fix_losses[key], ref_losses[key], rtol=1e-9, atol=1e-12)
        for opt, losses in ((opt_ref, ref_losses), (opt_fix, fix_losses)):
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    ref_params = dict(reference.named_parameters())
    for param_name, param in fixed.detector.named_parameters():
        torch.testing.assert_close(param, ref_params[param_name], rtol=1e-7, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_fixed_step_compiles_one_graph(name):
    """torch.compile(dynamic=False): one graph over 3 batches of other images and box counts."""
    reset()  # graphs and counters of earlier tests' compiles must not count here
    canvas = (128, 128)
    torch.manual_seed(0)
    model = FixedDetector(build_detector(NUM_CLASSES, canvas, name), canvas)
    model.train()
    options = StepOptions(compile=CompileOptions(fail_on_recompile=True))
    step = FixedStep(model, CPU, options)
    for i, counts in enumerate(([0], [3], [6])):
        losses = step(make_batch(20 + i, canvas, 1, counts))
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
    assert step.compiled.graphs_per_call == [1, 0, 0] and step.recompiles == 0


def test_retinanet_ranks_losses_sum_to_the_global_batch_loss():
    """DDP convention: each rank divides by the global batch (B x world size) images, so the
    ranks' losses sum to torchvision's loss on the whole batch (eval mode: BatchNorm then
    does not depend on how the batch is split)."""
    canvas = (64, 64)
    torch.manual_seed(0)
    model = FixedDetector(build_detector(NUM_CLASSES, canvas, "retinanet_resnet50_fpn"), canvas)
    model.eval()
    whole = make_batch(30, canvas, 4, [2, 0, 6, 3])
    single = FixedStep(model, CPU)(whole)
    two_ranks = FixedStep(model, CPU, StepOptions(world=World(rank=0, size=2)))
    shares = []
    for part in (slice(0, 2), slice(2, 4)):
        half = copy.copy(whole)
        half.images, half.boxes = whole.images[part], whole.boxes[part]
        half.labels, half.valid = whole.labels[part], whole.valid[part]
        shares.append(two_ranks(half))
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(shares[0][key] + shares[1][key], single[key])


def test_data_report_measures_each_models_own_anchors(tiny_coco):
    """SSD300: only its 300x300 canvas is reported; its smallest anchor is its own (~0.07 x
    300 = 21 px, clipped corners aside), not ssdlite's."""
    ann = tiny_coco / "annotations" / "instances_train2017.json"
    report = data_report(ann, (300, 300), NUM_CLASSES, batch_size=2, model="ssd300_vgg16")
    assert report["model"] == "ssd300_vgg16"
    assert {tuple(f["canvas"]) for f in report["fits"]} == {(300, 300)}
    assert {f["smallest_anchor_px"] for f in report["fits"]} == {
        round(smallest_anchor((300, 300), NUM_CLASSES, "ssd300_vgg16"), 1)
    }
    assert smallest_anchor((128, 128), NUM_CLASSES, "retinanet_resnet50_fpn") > smallest_anchor(
        (128, 128), NUM_CLASSES
    )  # RetinaNet's smallest anchors are 32 px at any canvas; ssdlite's scale with it


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_facts_are_what_torchvisions_builder_sets(name):
    """Family, box loss type and eval recipe on the spec equal the built detector's own, and
    the fixed loss gets that box loss type; a detector without a name: SSD -> the default
    spec, others -> an error (a RetinaNet's box loss type cannot be told from its class)."""
    spec = MODELS[name]
    detector = build_detector(NUM_CLASSES, spec.exact or (128, 128), name)
    classes = {SSD: "ssd", RetinaNet: "retinanet", FCOS: "fcos"}
    assert spec.family == classes[type(detector)]
    # torchvision references/detection's README: ssdlite / ssd / the default hflip
    recipes = {"ssdlite320_mobilenet_v3_large": "ssdlite", "ssd300_vgg16": "ssd"}
    assert train_recipe_of(spec) == recipes.get(name, "hflip")
    for field in dataclasses.fields(EvalRecipe):
        assert getattr(eval_recipe_of(spec), field.name) == getattr(detector, field.name)
    # SSD's regression head has no `_loss_type`: its Smooth-L1 is fixed (spec: None)
    assert spec.box_loss_type == getattr(detector.head.regression_head, "_loss_type", None)
    model = FixedDetector(detector, spec.exact or (128, 128))
    assert model.family.name == spec.family
    options = model.family.loss(spec).options
    assert getattr(options, "bbox_reg_loss_type", None) == spec.box_loss_type
    del detector.model_name
    if not isinstance(detector, SSD):
        with pytest.raises(ValueError, match="no model_name"):
            detector_spec(detector)
    else:
        assert detector_spec(detector) == MODELS[DEFAULT_MODEL]


@pytest.mark.parametrize("shape", ["fixed", "dynamic"])
def test_fcos_trains_on_the_configured_path(tiny_cfg, shape):
    """model=fcos_resnet50_fpn, built from the config: shape=fixed steps the fixed loss,
    shape=dynamic torchvision's own FCOS; both give torchvision's three losses, finite, with
    gradients for the head's third output (centerness)."""
    from ssd_npu.build import build_training
    from ssd_npu.engine.train_step import DynamicStep

    cfg = tiny_cfg("model=fcos_resnet50_fpn", "canvas=[64,64]", f"shape={shape}", "max_boxes=4")
    t = build_training(cfg)
    assert isinstance(t.step, FixedStep if shape == "fixed" else DynamicStep)
    losses = t.step(next(iter(t.data.train)))
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    ctrness = t.model.detector.head.regression_head.bbox_ctrness.weight
    assert ctrness.grad is not None and ctrness.grad.abs().sum() > 0


def test_no_module_branches_on_a_family_name():
    """What differs between families is asked of the family object: outside
    ssd_npu/families/ no module compares a value with a family's name (ssd_npu/data/ and
    ssd_npu/tools/ aside: there "ssd" names an augmentation recipe, and nothing a family)."""
    import re
    from pathlib import Path

    import ssd_npu
    from ssd_npu.families import FAMILIES

    package = Path(ssd_npu.__file__).parent
    names = "|".join(FAMILIES)
    compared = re.compile(
        rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)"""
    )
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.glob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compared.search(line) or re.search(r"\.kind\b", line)
    ]
    assert offenders == []
    assert compared.search('if spec.family == "fcos":')  # the pattern finds such a branch


def test_every_spec_names_a_registered_family():
    from ssd_npu.families import FAMILIES, family_of

    assert (
        {spec.family for spec in MODELS.values()} == set(FAMILIES) == {"ssd", "retinanet", "fcos"}
    )
    with pytest.raises(ValueError, match="'yolo' is not registered; one of: ssd, retinanet, fcos"):
        family_of("yolo")
