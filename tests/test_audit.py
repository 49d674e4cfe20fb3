"""Shape audit: it finds torchvision's dynamic sites, and finds none in the fixed pipeline."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd, transform

from ssd_npu.tools.audit import run_audit
from ssd_npu.tools.op_recorder import OpRecorder, sync_reason
from ssd_npu.tools.shapes import ShapeReport, analyse, format_report
from tests.helpers import REPO, tiny_config


@pytest.fixture(scope="module")
def reports(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ShapeReport]:
    out = tmp_path_factory.mktemp("audit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add spin-waiting on shared cores
    try:
        variants = {
            "fixed": ("shape=fixed",),
            "dynamic": ("shape=dynamic",),
            # data.augment_on=device: IoU crop, flip and fit recorded inside the step
            "device": ("shape=fixed", "data.augment_on=device", "data.slot=[320,320]"),
        }
        return {
            name: run_audit(
                tiny_config(
                    tiny_coco, out, "canvas=[128,128]", "audit.steps=3", *overrides, config="audit"
                )
            )
            for name, overrides in variants.items()
        }
    finally:
        torch.set_num_threads(threads)


def _line(module, text: str) -> int:
    """Line number of the first source line of `module` that contains `text`."""
    lines, _ = inspect.findsource(module)
    return next(i + 1 for i, line in enumerate(lines) if text in line)


def _find(entries: list[dict], op: str, site: str, kind: str = "fwd") -> dict:
    found = [e for e in entries if e["op"] == op and e["site"] == site and e["kind"] == kind]
    assert found, f"{kind} {op} at {site} not in {[(e['op'], e['site']) for e in entries]}"
    return found[0]


def test_fixed_pipeline_has_no_dynamic_op_and_no_sync(reports):
    report = reports["fixed"]
    data = report.info["data"]
    assert report.steps == 3 and report.info["shape"] == "fixed"
    assert report.info["canvas"] == [128, 128] and report.info["batch_size"] == 2
    # the proof only means something if the unfixed inputs did vary
    assert data["distinct_image_shapes"] > 1 and data["distinct_box_counts"] > 1
    assert data["device_batch_shapes"] == [{"images": [2, 3, 128, 128], "boxes": [2, 32, 4]}]
    assert report.dynamic_ops == []
    assert report.host_syncs == []
    # The loop reads each step's losses one step late, outside the step, through a copy that
    # never blocks (Device.to_host): recorded in the logging phase, no read makes the host wait.
    assert report.logging_syncs == []
    layout = report.to_dict()
    assert {"steps", "data", "shape", "dynamic_ops", "host_syncs", "logging_syncs"} <= set(layout)
    assert layout["data"] == data and layout["shape"] == "fixed"
    assert str(report) == format_report(layout)
    assert "dynamic ops: 0" in str(report) and "host syncs inside the step: 0" in str(report)


def test_device_augmentation_has_no_dynamic_op_and_no_sync(reports):
    """The augmentation and fit on the device (batched IoU crop, flip, resample, box maps) are
    part of the recorded step: no op whose shape changes, no host read."""
    report = reports["device"]
    data = report.info["data"]
    assert data["distinct_image_shapes"] > 1 and data["distinct_box_counts"] > 1
    assert data["device_batch_shapes"] == [{"images": [2, 3, 320, 320], "boxes": [2, 32, 4]}]
    assert report.dynamic_ops == [] and report.host_syncs == [] and report.logging_syncs == []
    assert report.steps == 3


def test_dynamic_pipeline_finds_torchvision_sites(reports):
    report = reports["dynamic"]
    dynamic, syncs = report.dynamic_ops, report.host_syncs
    ssd_py = "torchvision/models/detection/ssd.py"
    where = f"{ssd_py}:{_line(ssd, 'torch.where(matched_idxs_per_image >= 0)')}"
    assert _find(dynamic, "aten::nonzero", where)["distinct_shapes"] > 1
    assert _find(syncs, "aten::nonzero", where)["reason"].startswith("output size")
    # boolean indexing of the classification loss, forward and backward
    mask_sum = f"{ssd_py}:{_line(ssd, 'cls_loss[foreground_idxs].sum()')}"
    assert "boolean-mask" in _find(syncs, "aten::index", mask_sum)["reason"]
    _find(dynamic, "aten::index_put", mask_sum, kind="bwd")
    # the IoU matrix: one row per ground-truth box, box_iou called from SSD.forward
    box_iou_call = f"{ssd_py}:{_line(ssd, 'box_ops.box_iou(')}"
    iou = [e for e in dynamic if e["site"].startswith("torchvision/ops/boxes.py")]
    assert any(box_iou_call in e["called_from"] for e in iou)
    matcher = f"torchvision/models/detection/_utils.py:{_line(det_utils, 'matched_vals, matches')}"
    _find(dynamic, "aten::max", matcher)
    # per-image resize in GeneralizedRCNNTransform
    resize = f"torchvision/models/detection/transform.py:{_line(transform, 'interpolate(')}"
    assert _find(dynamic, "aten::upsample_bilinear2d", resize)["distinct_shapes"] > 1
    # degenerate_boxes.any() in a Python `if`: a value read on the host
    any_line = f"{ssd_py}:{_line(ssd, 'if degenerate_boxes.any():')}"
    _find(syncs, "aten::_local_scalar_dense", any_line)
    assert report.info["data"]["distinct_image_shapes"] > 1
    assert report.info["data"]["device_batch_shapes"] == []  # torchvision gets lists
    assert f"dynamic ops: {len(dynamic)} at " in str(report)


def test_analyse_compares_shape_sets_including_the_first_step():
    recorder = OpRecorder()
    for n in (3, 3, 5):  # the third step brings a new shape
        recorder.start_step()
        try:
            torch.ones(n) * 2  # the mul under test
            if n == 3 and len(recorder.steps) == 1:
                torch.zeros(4).clone()  # only in step 1, shape seen nowhere else: not dynamic
        finally:
            recorder.end_step()
    report = analyse(recorder)
    site = f"tests/test_audit.py:{_line(sys.modules[__name__], '# the mul under test')}"
    found = {(e["op"], e["site"]): e["distinct_shapes"] for e in report["dynamic_ops"]}
    assert found == {("aten::ones", site): 2, ("aten::mul", site): 2}
    assert report["host_syncs"] == []


def test_sync_reason_flags_bool_indexing_only():
    x = torch.arange(4.0)
    assert sync_reason("aten::index", (x, [x > 1]), None) is not None
    assert sync_reason("aten::index", (x, [torch.tensor([0, 2])]), None) is None
    assert sync_reason("aten::_local_scalar_dense", (x[0],), 0.0) is not None
    assert sync_reason("aten::add", (x, x), x) is None


@pytest.mark.slow  # a subprocess, ~9 s; run_audit (the `reports` fixture) is what it wraps
def test_script_writes_json_and_fails_on_dynamic(tiny_coco: Path, tmp_path: Path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "scripts" / "audit_shapes.py"), "data=coco"]
    cmd += [f"data.root={tiny_coco}", "device=cpu", "canvas=[128,128]", "batch_size=2"]
    cmd += ["num_workers=0", "shape=dynamic", "audit.steps=2", "audit.fail_on_dynamic=true"]
    cmd += [f"audit.out={out}", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"dynamic_ops", "host_syncs", "logging_syncs", "data", "steps"} <= set(report)
    assert report["steps"] == 2 and report["dynamic_ops"]
    assert "host syncs inside the step" in proc.stdout
