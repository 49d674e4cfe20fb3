"""eval.postprocess=device|host: the same COCO detections and mAP from either side.

The device path (`DeviceDetect`: network + fixed postprocess in one static function) must give
the records the host path (torchvision's own `postprocess_detections`) gives, so that the mAP
of a checkpoint does not depend on where its postprocess ran.
"""

from __future__ import annotations

import json

import pytest
import torch

from ssd_npu.build import build_evaluator, build_training, resolve_postprocess, shape_path
from ssd_npu.config import expand_short_forms, validate
from ssd_npu.device.backend import Device
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.cocoeval import as_dicts as result_dicts
from ssd_npu.evaluation.evaluate import (
    DeviceDetect,
    fixed_detections,
    pack_detections,
    unpack_detections,
)
from ssd_npu.models.postprocess import Detections, as_dicts
from tests.helpers import calibrate_batchnorm, compose_cfg, run_train, tiny_overrides


@pytest.mark.parametrize(
    ("choice", "device", "shape", "want"),
    [
        ("auto", "cpu", "fixed", "host"),
        ("auto", "cuda", "fixed", "device"),
        ("auto", "npu", "fixed", "device"),
        ("auto", "cuda", "dynamic", "host"),
        ("device", "cpu", "fixed", "device"),
        ("host", "npu", "fixed", "host"),
    ],
)
def test_resolve_postprocess(choice, device, shape, want):
    path = shape_path(compose_cfg(f"shape={shape}"))
    assert resolve_postprocess(choice, Device(device, 0), path) == want


def test_eval_short_form_and_bad_values():
    assert expand_short_forms(["eval=false", "eval_every=2", "eval.postprocess=host"]) == [
        "eval.enabled=false",
        "eval_every=2",
        "eval.postprocess=host",
    ]
    assert compose_cfg("eval=false").eval.enabled is False
    with pytest.raises(ConfigError, match=r"eval\.postprocess='gpu'.*auto, device, host"):
        validate(compose_cfg("eval.postprocess=gpu"))
    with pytest.raises(ConfigError, match="eval.postprocess=device needs shape=fixed"):
        validate(compose_cfg("eval.postprocess=device", "shape=dynamic"))


def test_pack_round_trip():
    g = torch.Generator().manual_seed(0)
    valid = torch.arange(5)[None] < torch.tensor([[3], [0]])  # a prefix of True per image
    det = Detections(
        torch.rand(2, 5, 4, generator=g) * 300,
        torch.rand(2, 5, generator=g),
        torch.randint(1, 91, (2, 5), generator=g),
        valid,
    )
    got, want = unpack_detections(pack_detections(det)), as_dicts(det)
    assert [len(d["scores"]) for d in got] == [3, 0]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"]) and a["labels"].dtype == torch.int64


@pytest.mark.parametrize(
    "model",
    [
        "ssdlite320_mobilenet_v3_large",
        "retinanet_resnet50_fpn",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
    ],
)
def test_device_and_host_records_are_equal(tiny_cfg, model):
    """Same weights, same val batches: the same records (boxes, scores, labels) either way."""
    cfg = tiny_cfg(f"model={model}", "canvas=[128,128]")
    t = build_training(cfg)
    calibrate_batchnorm(t.model, t.data.val)  # BatchNorm on real statistics: distinct scores
    # RetinaNet's and FCOS's prior (p = 0.01) keeps every score below 0.05 (FCOS: 0.2)
    if not model.startswith("ssd"):
        with torch.no_grad():
            t.model.detector.head.classification_head.cls_logits.bias += 3.0
    host_found = fixed_detections(t.model, t.data.val, t.device)
    host, host_ids = result_dicts(host_found.results), host_found.image_ids
    detect = DeviceDetect(t.model, t.device)
    device_found = fixed_detections(t.model, t.data.val, t.device, detect=detect)
    device, device_ids = result_dicts(device_found.results), device_found.image_ids
    assert host_ids == device_ids and len(host) > 0
    assert len(device) == len(host)
    # records in a fixed order (ties in score may be listed either way round)
    device, host = (
        sorted(r, key=lambda x: (x["image_id"], -x["score"], x["bbox"])) for r in (device, host)
    )
    for a, b in zip(device, host, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)


def test_build_evaluator_follows_the_config(tiny_cfg):
    t_cfg = tiny_cfg("canvas=[128,128]", "eval.postprocess=device")
    t = build_training(t_cfg)
    assert build_evaluator(t_cfg, t).postprocess == "device"
    t_cfg.eval.postprocess = "auto"  # on the cpu: the host
    assert build_evaluator(t_cfg, t).postprocess == "host"


def test_checkpoint_map_is_the_same_either_way(tiny_coco, tmp_path):
    """`python train.py eval_only=true weights=PATH eval.postprocess=device` and `=host` print
    the same mAP for a trained checkpoint."""
    common = tiny_overrides(tiny_coco, "canvas=[128,128]", "max_boxes=8", "batch_size=4")
    train = run_train(
        *common, "max_steps=12", "optim.lr=0.02", "eval=false", f"hydra.run.dir={tmp_path / 't'}"
    )
    assert train.returncode == 0, train.stderr[-2000:]
    (weights,) = sorted((tmp_path / "t" / "checkpoints").glob("*.pt"))
    summaries = {}
    for side in ("device", "host"):
        out = tmp_path / side
        run = run_train(
            *common, "eval_only=true", f"weights={weights}", f"eval.postprocess={side}",
            f"hydra.run.dir={out}",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert '"mAP"' in run.stdout  # the printed summary
        summaries[side] = json.loads((out / "summary.json").read_text())["eval"]
        assert summaries[side]["postprocess"] == side
    device, host = summaries["device"], summaries["host"]
    assert device["history"][-1]["num_detections"] == host["history"][-1]["num_detections"] > 0
    assert device["mAP"] == pytest.approx(host["mAP"], abs=1e-4)
    assert device["mAP50"] == pytest.approx(host["mAP50"], abs=1e-4)


@pytest.mark.parametrize("model", ["ssdlite320_mobilenet_v3_large", "fcos_resnet50_fpn"])
def test_audit_of_the_device_eval_forward_is_static(tiny_cfg, tmp_path, model):
    """audit.target=eval with eval.postprocess=device: no dynamic op, no host sync; the host
    postprocess, recorded the same way, syncs (boolean masks, nonzero in NMS)."""
    from ssd_npu.tools.audit import run_audit

    common = (f"model={model}", "canvas=[128,128]", "audit.target=eval", "audit.steps=3")
    device = run_audit(
        tiny_cfg(*common, "eval.postprocess=device", out=tmp_path / "d", config="audit")
    )
    assert device.info["postprocess"] == "device" and device.info["target"] == "eval"
    assert device.dynamic_ops == [] and device.host_syncs == []
    assert device.steps == 3
    host = run_audit(tiny_cfg(*common, "eval.postprocess=host", out=tmp_path / "h", config="audit"))
    assert any("nonzero" in sync["op"] for sync in host.host_syncs)


@pytest.mark.slow
def test_device_eval_is_one_graph_under_compile(tiny_cfg):
    """compile=true eval.postprocess=device: network + postprocess compile into one graph, used
    for every val batch (the last one filled to the batch size); the count is in summary.json.
    (compiler.backend=eager: dynamo's graph capture without inductor's minutes of codegen.)"""
    from ssd_npu.train import run

    cfg = tiny_cfg(
        "canvas=[128,128]", "max_boxes=8", "max_steps=1", "compile=true", "compiler.backend=eager",
        "eval.postprocess=device", "batch_size=4",
    )  # fmt: skip
    summary = run(cfg)
    assert summary["eval"]["postprocess"] == "device"
    assert summary["eval"]["graphs_compiled"] == 1  # 6 val images, batch 4: 2 batches, 1 graph
    assert summary["eval"]["history"][-1]["num_images"] == 6
