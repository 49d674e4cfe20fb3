"""`ssd_npu.find_dynamic_shapes` on user functions: the line of a boolean mask, nothing for the
same function with torch.where, torchvision's own sites in SSD.compute_loss, and zero for the
fixed model + loss."""

from __future__ import annotations

import inspect
import json

import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.ops import box_iou

from ssd_npu import FixedSSD, build_detector, find_dynamic_shapes, fixed_ssd_loss

THIS = "tests/test_find_shapes.py"


def masked_step(x: torch.Tensor) -> torch.Tensor:
    keep = x > 0
    return x[keep].sum()  # boolean mask: output size = number of True


def where_step(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.0).sum()


def _line(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def _batches() -> list[torch.Tensor]:
    # the same shape every call, a different number of positives: only the mask varies
    return [torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.tensor([1.0, 1.0, 2.0, -2.0])]


def test_boolean_mask_is_flagged_at_the_user_line():
    report = find_dynamic_shapes(masked_step, _batches())
    site = f"{THIS}:{_line(masked_step, 'x[keep]')}"
    assert any(e["site"] == site and e["op"] == "aten::index" for e in report.dynamic_ops)
    assert any(e["site"] == site for e in report.host_syncs)
    assert "dynamic ops: 1" in str(report) or "dynamic ops:" in str(report)
    assert site in str(report)


def test_same_function_with_where_reports_nothing(tmp_path):
    report = find_dynamic_shapes(where_step, _batches())
    assert report.dynamic_ops == [] and report.host_syncs == []
    saved = json.loads(report.save(tmp_path / "r.json").read_text())
    assert saved["dynamic_ops"] == [] and saved["steps"] == 2


def _torchvision_loss_step(model, anchors, head):
    def step(targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        matched = [model.proposal_matcher(box_iou(t["boxes"], anchors)) for t in targets]
        losses = model.compute_loss(targets, head, [anchors] * len(targets), matched)
        return sum(losses.values())

    return step


def test_torchvision_compute_loss_sites_are_found():
    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    fixed = FixedSSD(model, (128, 128))
    anchors = fixed.anchors
    a = anchors.shape[0]
    head = {"cls_logits": torch.randn(2, a, 4), "bbox_regression": torch.randn(2, a, 4)}

    def targets(n: int) -> list[dict[str, torch.Tensor]]:
        xy = torch.rand(n, 2) * 80
        boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2) * 20], 1)
        return [{"boxes": boxes, "labels": torch.randint(1, 4, (n,))}] * 2

    report = find_dynamic_shapes(
        _torchvision_loss_step(model, anchors, head), [targets(1), targets(3), targets(5)]
    )
    sites = {e["site"] for e in report.dynamic_ops}
    assert any(s.startswith("torchvision/models/detection/ssd.py:") for s in sites), sites
    syncs = {(e["site"].split(":")[0], e["op"]) for e in report.host_syncs}
    assert ("torchvision/models/detection/ssd.py", "aten::nonzero") in syncs


def test_fixed_model_and_loss_report_zero():
    torch.manual_seed(0)
    model = FixedSSD(build_detector(num_classes=4, canvas=(128, 128)), (128, 128))

    def step(batch):
        images, boxes, labels, valid = batch
        model.zero_grad(set_to_none=True)  # as a training loop does: the same grad ops each step
        cls_logits, bbox_regression = model(images)
        losses = fixed_ssd_loss(cls_logits, bbox_regression, model.anchors, boxes, labels, valid)
        sum(losses.values()).backward()

    def batch(n_valid: int):
        xy = torch.rand(2, 8, 2) * 80
        boxes = torch.cat([xy, xy + 30], -1)
        valid = torch.arange(8)[None].expand(2, 8) < n_valid
        return torch.rand(2, 3, 128, 128), boxes, torch.randint(1, 4, (2, 8)), valid

    report = find_dynamic_shapes(step, [batch(1), batch(5), batch(8)])
    assert report.dynamic_ops == [] and report.host_syncs == []
    assert "dynamic ops: 0 at 0 sites" in str(report)
