"""Data report: the vectorised filtering matches the loader, the numbers add up, the CLI runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssd_npu.data.box_table import box_table, load_coco
from ssd_npu.data.coco import CocoDetectionDataset
from ssd_npu.data.fixed_shape import fit_to_canvas
from ssd_npu.errors import DataError
from ssd_npu.tools.data_report import data_report, fit_scales
from ssd_npu.tools.recommend import truncation
from ssd_npu.tools.report_render import format_report
from tests.helpers import REPO


def test_box_table_matches_the_loaders_targets(tiny_coco):
    ds = CocoDetectionDataset(tiny_coco, "train2017")
    t = box_table(ds.coco, ds.ids)
    for i in range(len(ds)):
        _, target = ds[i]  # decodes the image: the reference the report must agree with
        boxes = target["boxes"]
        assert t.counts[i] == len(boxes)
        wh = (boxes[:, 2:] - boxes[:, :2]).double().numpy()
        np.testing.assert_allclose(t.box_wh[t.box_image == i], wh, rtol=1e-5, atol=1e-3)
    assert t.crowd > 0  # the synthetic set carries crowd regions: they must be filtered


def test_degenerate_and_crowd_boxes_are_filtered():
    coco = load_coco_from(
        images=[{"id": 7, "width": 100, "height": 50}, {"id": 3, "width": 10, "height": 10}],
        anns=[
            (7, [10, 10, 20, 20], 0),  # kept
            (7, [120, 10, 20, 20], 0),  # right of the image: empty after clipping
            (7, [10, 10, 0, 5], 0),  # zero width
            (7, [0, 0, 50, 50], 1),  # crowd
            (3, [-5, -5, 10, 10], 0),  # clipped to 5x5, kept
        ],
    )
    t = box_table(coco)
    assert t.image_ids.tolist() == [3, 7] and t.counts.tolist() == [1, 1]
    assert t.crowd == 1 and t.degenerate == 2
    assert sorted(t.box_wh.tolist()) == [[5.0, 5.0], [20.0, 20.0]]


def load_coco_from(images, anns):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": images,
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": k + 1, "image_id": i, "bbox": b, "iscrowd": c, "category_id": 1}
            for k, (i, b, c) in enumerate(anns)
        ],
    }
    coco.createIndex()
    return coco


def test_truncation_counts():
    counts = np.array([0, 1, 2, 10])
    row = truncation(counts, 2)
    assert row["images_truncated_pct"] == 25.0
    assert row["boxes_dropped_pct"] == round(100 * 8 / 13, 3)
    assert row["padding_rows_pct"] == round(100 * (1 - 5 / 8), 2)


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "pad"])
def test_fit_scales_match_fit_to_canvas(fit):
    sizes = [(50, 90), (300, 200), (128, 128), (97, 401)]
    h = np.array([s[0] for s in sizes], dtype=np.float64)
    w = np.array([s[1] for s in sizes], dtype=np.float64)
    sx, sy, area = fit_scales(h, w, (128, 160), fit)
    for i, (hh, ww) in enumerate(sizes):
        image = torch.zeros(3, hh, ww, dtype=torch.uint8)
        _, _, info = fit_to_canvas(image, torch.zeros(0, 4), (128, 160), fit)
        np.testing.assert_allclose([sx[i], sy[i]], info.scale, rtol=1e-6)
        assert area[i] == info.content_size[0] * info.content_size[1]


def test_report_on_the_tiny_set(tiny_coco):
    ann = tiny_coco / "annotations" / "instances_train2017.json"
    r = data_report(ann, (128, 128), num_classes=6, batch_size=2)
    counts = box_table(load_coco(ann)).counts
    assert r["images"] == 12 and r["boxes"] == counts.sum()
    assert r["boxes_per_image"]["max"] == counts.max()
    rec = r["recommendation"]
    # the smallest max_boxes within the 0.1% budget: one less must drop more
    assert truncation(counts, rec["max_boxes"])["boxes_dropped_pct"] <= 0.1
    assert truncation(counts, rec["max_boxes"] - 1)["boxes_dropped_pct"] > 0.1
    assert rec["buckets"][-1] == rec["max_boxes"] and rec["buckets"] == sorted(rec["buckets"])
    assert {f["fit"] for f in r["fits"]} == {"stretch", "letterbox", "pad"}
    assert all(f["smallest_anchor_px"] > 0 for f in r["fits"])
    assert "recommendation: canvas=" in format_report(r)
    json.dumps(r)  # JSON-ready


def test_missing_annotation_file_names_it(tmp_path):
    with pytest.raises(DataError, match="instances_x.json"):
        load_coco(tmp_path / "instances_x.json")


@pytest.mark.slow  # a subprocess, ~8 s; test_report_on_the_tiny_set covers data_report
def test_cli_writes_the_json(tiny_coco, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "data_report.py"),
            "data=coco",
            f"data.root={tiny_coco}",
            "data.num_classes=6",
            "canvas=[128,128]",
            f"report.out={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "recommendation:" in proc.stdout
    assert json.loads(out.read_text())["images"] == 12


def test_pngs_when_matplotlib_is_installed(tiny_coco, tmp_path):
    pytest.importorskip("matplotlib")
    from ssd_npu.tools.report_render import save_pngs

    ann = tiny_coco / "annotations" / "instances_train2017.json"
    pngs = save_pngs(ann, data_report(ann, (128, 128), num_classes=6), tmp_path)
    assert [p.name for p in pngs] == ["boxes_per_image.png", "aspect_ratio.png", "box_size.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_buckets_too_small_for_two_batches_are_merged():
    from ssd_npu.tools.recommend import merge_small_buckets

    counts = np.array([1] * 30 + [12] * 5 + [20] * 3)
    # bucket 16 (5 images) and 20 (3) cannot fill 2 batches of 4: 16's bound goes, 20 takes them
    assert merge_small_buckets(counts, [8, 16, 20], 8) == [8, 20]
    assert merge_small_buckets(counts, [8, 16, 20], 3) == [8, 16, 20]
    assert merge_small_buckets(counts, [8, 20], 100) == [20]
