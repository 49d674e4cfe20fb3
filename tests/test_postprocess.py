"""The fixed postprocess equals each detector's own `postprocess_detections` (the host path,
ssd_npu.evaluation.evaluate.postprocess_fixed): the same boxes, scores and labels, bit for bit,
on random head outputs with distinct scores, for ssdlite320, ssd300, RetinaNet v1 and FCOS."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

from ssd_npu.evaluation.evaluate import postprocess_fixed
from ssd_npu.models.detector import FixedDetector, build_detector
from ssd_npu.models.postprocess import Detections, as_dicts, fixed_postprocess

BATCH = 3
# model name -> (canvas, num_classes): small canvases, few classes, to stay fast
MODELS = {
    "ssdlite320_mobilenet_v3_large": ((128, 128), 6),  # 522 anchors, up to 5 x 300 candidates
    "ssd300_vgg16": ((300, 300), 4),  # 8732 anchors, up to 3 x 400 candidates
    "retinanet_resnet50_fpn": ((64, 64), 4),  # 774 anchors, up to 1792 candidates
    "fcos_resnet50_fpn": ((128, 128), 4),  # 341 locations, up to 1000 + 340 x 4 candidates
}
# (low, high, background bias, seed) of the random logits: "many" gives torchvision's
# batched_nms more than 1000 candidates per image (its nms-per-class path), "few" at most 1000
# (its class-shifted path). The seeds give distinct candidate scores (softmax can tie).
REGIMES = {
    "ssdlite320_mobilenet_v3_large": {"many": (-2.0, 2.0, 0.0, 4), "few": (-2.0, 2.0, 8.0, 3)},
    "ssd300_vgg16": {"many": (-2.0, 2.0, 0.0, 1), "few": (-2.0, 2.0, 7.6, 3)},
    "retinanet_resnet50_fpn": {"many": (-2.5, 2.5, 0.0, 4), "few": (-8.0, -2.0, 0.0, 3)},
    # FCOS: the "background" is the centerness logits' mean (score sqrt(sigmoid x sigmoid))
    "fcos_resnet50_fpn": {"many": (-1.0, 3.0, 2.0, 4), "few": (-8.0, -2.0, 1.0, 3)},
}


@pytest.fixture(scope="module")
def models() -> dict[str, FixedDetector]:
    torch.manual_seed(0)
    return {
        name: FixedDetector(build_detector(classes, canvas, name), canvas).eval()
        for name, (canvas, classes) in MODELS.items()
    }


def head_outputs(
    model: FixedDetector, low: float, high: float, background: float, seed: int
) -> tuple[Tensor, ...]:
    """Random cls_logits [B, A, C] (each image a permutation of evenly spaced values in
    [low, high], so all distinct; column 0 + background for SSD) and bbox_regression [B, A, 4]
    (deltas ~ N(0, 0.5): boxes overlapping their neighbours, clipped at the border; FCOS:
    their absolute values + 4, >= 0 as its head's ReLU gives); FCOS also bbox_ctrness [B, A, 1]
    ~ N(background, 1)."""
    g = torch.Generator().manual_seed(seed)
    anchors, classes = model.anchors.shape[0], MODELS[model.detector.model_name][1]
    grid = torch.linspace(low, high, anchors * classes)
    logits = torch.stack([grid[torch.randperm(grid.numel(), generator=g)] for _ in range(BATCH)])
    logits = logits.view(BATCH, anchors, classes)
    if model.family.name == "ssd":
        logits[..., 0] += background
    regression = torch.randn(BATCH, anchors, 4, generator=g) * 0.5
    if model.family.name != "fcos":
        return logits, regression
    ctrness = torch.randn(BATCH, anchors, 1, generator=g) + background
    return logits, regression.abs() + 4.0, ctrness  # boxes ~9 strides wide: NMS bites


def pair_scores(model: FixedDetector, head: tuple[Tensor, ...]) -> Tensor:
    """Per (image, anchor, class) score as torchvision's postprocess computes it: [B, A, C]
    (sigmoid for RetinaNet, sqrt(sigmoid x sigmoid(centerness)) for FCOS)."""
    if model.family.name == "fcos":
        return torch.sqrt(torch.sigmoid(head[0]) * torch.sigmoid(head[2]))
    return torch.sigmoid(head[0])


def candidate_scores(model: FixedDetector, head: tuple[Tensor, ...]) -> list[Tensor]:
    """Per image, the scores torchvision's postprocess hands to batched_nms (threshold, then
    top-k per class for SSD, per level for RetinaNet and FCOS)."""
    detector, out = model.detector, []
    for image, scores in zip(head[0], pair_scores(model, head), strict=True):
        if model.family.name == "ssd":
            groups = list(torch.softmax(image, dim=-1)[:, 1:].T)
        else:
            groups = [p.flatten() for p in scores.split(model.anchors_per_level)]
        kept = [s[s > detector.score_thresh] for s in groups]
        out.append(torch.cat([s.topk(min(len(s), detector.topk_candidates)).values for s in kept]))
    return out


def assert_equal_to_torchvision(model: FixedDetector, *head: Tensor) -> None:
    """fixed_postprocess == postprocess_detections image by image, bit for bit."""
    fixed = fixed_postprocess(model, *head)
    d = model.detector.detections_per_img
    assert isinstance(fixed, Detections)
    assert fixed.boxes.shape == (BATCH, d, 4) and fixed.valid.shape == (BATCH, d)
    assert fixed.scores.shape == fixed.labels.shape == (BATCH, d)
    assert torch.equal(fixed.valid, fixed.valid.cummin(dim=1).values)  # a prefix of True
    assert not fixed.scores[~fixed.valid].any() and not fixed.boxes[~fixed.valid].any()
    want = postprocess_fixed(model, *head)
    for b, (got, ref) in enumerate(zip(as_dicts(fixed), want, strict=True)):
        assert len(ref["scores"]) > 0, "a case with no detection tests nothing"
        for key in ("boxes", "scores", "labels"):
            assert got[key].dtype == ref[key].dtype, key
            assert torch.equal(got[key], ref[key]), f"image {b}: {key}"


@pytest.mark.parametrize("regime", ["many", "few"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fixed_postprocess_equals_torchvisions(models, name, regime):
    model = models[name]
    head = head_outputs(model, *REGIMES[name][regime])
    want = postprocess_fixed(model, *head)
    top = model.detector.detections_per_img
    # the preconditions: distinct scores, the intended NMS path, and NMS changes the result
    for scores, ref in zip(candidate_scores(model, head), want, strict=True):
        assert scores.unique().numel() == scores.numel()
        assert (scores.numel() > 1000) == (regime == "many"), scores.numel()
        assert not torch.equal(scores.sort(descending=True).values[:top], ref["scores"])
    assert_equal_to_torchvision(model, *head)


def test_fewer_candidates_than_detections_are_padded(models):
    """ssdlite with one foreground class: fewer candidates than detections_per_img (300), so
    every image has invalid slots at the end, and the valid ones still equal torchvision's."""
    canvas = (64, 64)
    model = FixedDetector(build_detector(2, canvas, "ssdlite320_mobilenet_v3_large"), canvas).eval()
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(BATCH, model.anchors.shape[0], 2, generator=g)
    regression = torch.randn(BATCH, model.anchors.shape[0], 4, generator=g) * 0.5
    fixed = fixed_postprocess(model, logits, regression)
    assert (fixed.valid.sum(dim=1) < 144).all() and fixed.valid[:, 0].all()
    want = postprocess_fixed(model, logits, regression)
    for got, ref in zip(as_dicts(fixed), want, strict=True):
        assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    "name", ["ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"]
)
def test_fixed_postprocess_compiles_to_one_graph(models, name):
    """torch.compile(dynamic=False) of the whole postprocess: one graph, no break, and the
    same detections as eager and torchvision on two batches (a small top-k keeps it quick)."""
    model = models[name]
    detector = model.detector
    saved = detector.topk_candidates, detector.detections_per_img
    detector.topk_candidates, detector.detections_per_img = 12, 10
    try:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(fixed_postprocess, backend="aot_eager", dynamic=False)
        for seed in (1, 2):
            low, high, background, _ = REGIMES[name]["many"]
            head = head_outputs(model, low, high, background, seed)
            got = compiled(model, *head)
            want = fixed_postprocess(model, *head)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert counters["stats"]["unique_graphs"] == 1
        assert sum(counters["graph_break"].values()) == 0
        assert_equal_to_torchvision(model, *head)
    finally:
        detector.topk_candidates, detector.detections_per_img = saved
        torch._dynamo.reset()
