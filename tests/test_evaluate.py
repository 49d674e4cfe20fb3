"""Evaluation: the canvas -> original box mapping is exact (GT as predictions gives mAP 1.0),
the fixed path runs end to end, and it agrees with torchvision's own dynamic inference."""

from collections import defaultdict

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ssd_npu.build import build_training, loader_spec, shape_path
from ssd_npu.data.coco import CocoDetectionDataset
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.data.loader import build_loaders
from ssd_npu.device.backend import Device
from ssd_npu.device.distributed import World
from ssd_npu.evaluation.cocoeval import as_dicts
from ssd_npu.evaluation.evaluate import (
    Evaluator,
    coco_map,
    dynamic_detections,
    fixed_batch_results,
    fixed_detections,
)
from ssd_npu.evaluation.records import empty_results
from tests.helpers import calibrate_batchnorm


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "pad"])
@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_ground_truth_as_predictions_gives_map_one(tiny_coco, tiny_cfg, fit, split):
    # canvas [H=320, W=448]: non-square; the tiny set has images smaller than it in both
    # sides (pad keeps them unscaled) and larger ones (every mode scales them)
    overrides = [f"fit={fit}", "canvas=[320,448]", "batch_size=4", "max_boxes=48"]
    cfg = tiny_cfg(*overrides, f"data.val_split={split}")
    spec = loader_spec(cfg, World(), Device("cpu", None))
    data = build_loaders(spec, shape_path(cfg).batches, tiny_coco)
    assert data.val_set.split == split
    coco = data.val_set.coco
    sizes = [(img["height"], img["width"]) for img in coco.imgs.values()]
    assert any(h <= 320 and w <= 448 for h, w in sizes)
    assert any(h > 320 or w > 448 for h, w in sizes)

    records, unmapped, ids = [], [], []
    for batch in data.val:
        assert isinstance(batch, FixedBatch) and batch.boxes_dropped == 0
        # the fitted (canvas-pixel) ground truth, fed back as detections with score 1
        gt = [
            {"boxes": b[v], "scores": torch.ones(int(v.sum())), "labels": lab[v]}
            for b, lab, v in zip(batch.boxes, batch.labels, batch.valid, strict=True)
        ]
        records.append(fixed_batch_results(batch, gt))
        ids += [i for i in batch.image_ids.tolist() if i >= 0]
        # control: the same boxes left in canvas pixels (no unfit) must score clearly worse
        unit = FixedBatch(**{**vars(batch), "scales": torch.ones_like(batch.scales)})
        unmapped.append(fixed_batch_results(unit, gt))

    assert sorted(ids) == sorted(coco.imgs)  # every image once, padding repeats skipped
    non_crowd = [a for a in coco.anns.values() if not a["iscrowd"]]
    # the set covers COCOeval's special cases: crowd regions (ignored, not predicted) and
    # images without objects
    assert any(a["iscrowd"] for a in coco.anns.values())
    assert set(coco.imgs) - {a["image_id"] for a in non_crowd}
    records, unmapped = np.concatenate(records), np.concatenate(unmapped)
    assert len(records) == len(non_crowd)
    result = coco_map(coco, records, ids)
    assert result["mAP"] == pytest.approx(1.0)
    assert result["mAP50"] == pytest.approx(1.0)
    assert result["num_images"] == len(coco.imgs)
    assert coco_map(coco, unmapped, ids)["mAP"] < 0.9


def test_coco_map_without_detections(tiny_coco):
    coco = CocoDetectionDataset(tiny_coco, "val2017").coco
    result = coco_map(coco, empty_results(), list(coco.imgs))
    assert result["mAP"] == 0.0 and result["num_detections"] == 0 and "note" in result


def test_evaluate_fixed_end_to_end(tiny_cfg):
    cfg = tiny_cfg("fit=letterbox", "canvas=[128,128]", "batch_size=4")
    t = build_training(cfg)
    val_set = t.data.val_set
    calibrate_batchnorm(t.model, t.data.val)
    assert t.model.training
    detections = t.path.detections(t.model, t.device, amp=False, detect=None)  # shape=fixed
    result = Evaluator(detections, t.data.val, val_set.coco).run()
    assert t.model.training  # the previous mode is restored
    assert {"mAP", "mAP50", "stats", "num_images", "num_detections"} <= result.keys()
    assert isinstance(result["mAP"], float) and 0.0 <= result["mAP"] <= 1.0
    assert len(result["stats"]) == 12
    assert result["num_images"] == len(val_set.coco.imgs) == 6  # 6 images, batch 4: padded
    assert result["num_detections"] > 0

    found = fixed_detections(t.model, t.data.val, t.device)
    records, ids = as_dicts(found.results), found.image_ids
    assert len(records) == result["num_detections"] and sorted(ids) == sorted(val_set.coco.imgs)
    for r in records:  # letterbox padding lies outside the image: boxes must not
        img = val_set.coco.imgs[r["image_id"]]
        x, y, w, h = r["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= img["width"] + 1e-3 and y + h <= img["height"] + 1e-3
        assert 1 <= r["category_id"] <= 5 and 0.001 < r["score"] <= 1.0


def _per_image(records):
    out = defaultdict(list)
    for r in records:
        out[r["image_id"]].append(r)
    return out


def test_fixed_and_dynamic_agree_on_stretch(tiny_cfg):
    cfg = tiny_cfg("fit=stretch", "canvas=[128,128]", "batch_size=2")
    t = build_training(cfg)
    calibrate_batchnorm(t.model, t.data.val)
    dynamic_path = shape_path(OmegaConf.merge(cfg, {"shape": "dynamic"}))
    spec = loader_spec(cfg, t.world, t.device)
    dyn_loader = build_loaders(spec, dynamic_path.batches, t.data_root).val
    coco = t.data.val_set.coco

    fixed_fn = t.path.detections(t.model, t.device, amp=False, detect=None)
    dynamic_fn = dynamic_path.detections(t.model, t.device, amp=False, detect=None)
    fixed = Evaluator(fixed_fn, t.data.val, coco).run()
    dynamic = Evaluator(dynamic_fn, dyn_loader, coco).run()
    assert t.model.training and t.model.detector.training  # the previous mode is restored
    assert fixed["num_images"] == dynamic["num_images"] == 6
    assert fixed["num_detections"] == dynamic["num_detections"] > 0
    assert fixed["stats"] == pytest.approx(dynamic["stats"], abs=1e-3)  # all 12 AP/AR numbers

    fixed_recs = as_dicts(fixed_detections(t.model, t.data.val, t.device).results)
    dyn_recs = as_dicts(dynamic_detections(t.model.detector, dyn_loader, t.device).results)
    f_img, d_img = _per_image(fixed_recs), _per_image(dyn_recs)
    assert f_img.keys() == d_img.keys()
    assert len({f_img[i][0]["score"] for i in f_img}) > 1  # detections depend on the image
    for image_id in f_img:
        f, d = f_img[image_id], d_img[image_id]
        assert len(f) == len(d)
        # the best detections (clear of score ties) are the same boxes in original pixels
        for a, b in zip(f[:20], d[:20], strict=True):
            assert a["category_id"] == b["category_id"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)
        # all of them, in any order (near-equal scores may swap): a same-class box within 0.05 px
        fb, db = (torch.tensor([r["bbox"] for r in x], dtype=torch.float64) for x in (f, d))
        dist = (fb[:, None] - db[None]).abs().amax(-1)
        fc, dc = (torch.tensor([r["category_id"] for r in x]) for x in (f, d))
        dist[fc[:, None] != dc[None]] = float("inf")
        assert (dist.amin(1) < 0.05).float().mean() >= 0.99
