"""eval.coco: faster-coco-eval gives pycocotools' 12 stats (to 1e-4) on the synthetic set, on
COCOeval's special cases (crowd regions, images without objects or without detections, more
detections than maxDets, tied scores, a class without ground truth) and on a COCO-val-sized
result (slow)."""

import json

import numpy as np
import pytest

from ssd_npu.build import build_training
from ssd_npu.config import validate
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.cocoeval import ENGINES, GroundTruth, evaluate
from ssd_npu.evaluation.evaluate import coco_map, fixed_detections
from ssd_npu.tools.coco_results import coco_val_sized, noisy_results
from tests.helpers import calibrate_batchnorm, compose_cfg


def both_engines(dataset: dict, results: np.ndarray, image_ids: list[int]) -> dict[str, list]:
    gt = GroundTruth(dataset)
    return {engine: evaluate(gt, results, image_ids, engine).stats for engine in ENGINES}


def assert_equal_stats(stats: dict[str, list]) -> None:
    assert len(stats["faster"]) == len(stats["pycocotools"]) == 12
    assert stats["faster"] == pytest.approx(stats["pycocotools"], abs=1e-4)


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_equal_stats_on_the_synthetic_set(tiny_coco, split):
    dataset = json.loads((tiny_coco / "annotations" / f"instances_{split}.json").read_text())
    results = noisy_results(dataset, per_image=30, seed=1)
    ids = [img["id"] for img in dataset["images"]]
    stats = both_engines(dataset, results, ids)
    assert_equal_stats(stats)
    assert 0.0 < stats["faster"][0] < 1.0  # neither trivial nor perfect


def test_equal_stats_on_a_models_detections(tiny_cfg):
    """The detections of the fixed path (a calibrated untrained model) on the tiny val set."""
    cfg = tiny_cfg("canvas=[128,128]", "batch_size=4")
    t = build_training(cfg)
    calibrate_batchnorm(t.model, t.data.val)
    found = fixed_detections(t.model, t.data.val, t.device)
    coco = t.data.val_set.coco
    assert len(found.results) > 0
    stats = {e: coco_map(coco, found.results, found.image_ids, e)["stats"] for e in ENGINES}
    assert_equal_stats(stats)


def _box(x: float, y: float, w: float, h: float) -> list[float]:
    return [float(x), float(y), float(w), float(h)]


def edge_case_set() -> tuple[dict, np.ndarray]:
    """Six images, four classes: image 1 has a crowd region with detections inside it (to be
    ignored, not false positives); image 2 has no objects but detections; image 3 objects
    but no detections; image 4 has 150 detections (maxDets 1 / 10 / 100 all cut) of small,
    medium and large objects, with tied scores; image 6 nothing at all; class 4 has no
    ground truth anywhere (its AP is -1, left out of the means)."""
    rng = np.random.default_rng(3)
    images = [{"id": i, "height": 480, "width": 640} for i in range(1, 7)]
    anns: list[dict] = []

    def ann(image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> None:
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": cat,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": crowd,
            }
        )

    ann(1, 1, _box(10, 10, 50, 60))
    ann(1, 1, _box(300, 200, 80, 40))
    ann(1, 1, _box(400, 300, 200, 150), crowd=1)
    ann(3, 2, _box(100, 100, 30, 30))
    ann(3, 2, _box(200, 100, 120, 90))
    for k in range(12):  # image 4: sizes from 8 to 250 px (small, medium, large)
        side = 8 + 22 * k
        ann(4, 3, _box(5 + 50 * (k % 6), 5 + 200 * (k // 6), side, side * 0.8))
    ann(5, 2, _box(0, 0, 640, 480))
    dets = [
        (1, 10, 12, 50, 58, 0.9, 1),
        (1, 302, 198, 78, 44, 0.8, 1),
        (1, 420, 320, 50, 50, 0.85, 1),  # inside the crowd region: ignored
        (1, 450, 350, 60, 40, 0.7, 1),  # inside the crowd region: ignored
        (1, 500, 10, 40, 40, 0.95, 1),  # a false positive above the rest
        (2, 50, 50, 100, 100, 0.6, 2),  # image without objects
        (2, 150, 150, 10, 10, 0.6, 4),  # a class without ground truth
        (5, 5, 5, 630, 470, 0.5, 2),
        (5, 5, 5, 630, 470, 0.5, 3),  # tie, other class
    ]
    rows = np.array(dets, dtype=np.float64)
    gt4 = np.array([a["bbox"] for a in anns if a["image_id"] == 4])
    extra = np.zeros((150, 7))
    extra[:, 0] = 4
    pick = rng.integers(0, len(gt4), 150)
    extra[:, 1:5] = gt4[pick] + rng.normal(0, 3, (150, 4))
    extra[:, 3:5] = np.maximum(extra[:, 3:5], 1.0)
    extra[:, 5] = np.round(rng.random(150), 2)  # two decimals: many ties
    extra[:, 6] = np.where(rng.random(150) < 0.7, 3, rng.integers(1, 5, 150))
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)]
    dataset = {"images": images, "annotations": anns, "categories": categories}
    return dataset, np.concatenate([rows, extra])


def test_equal_stats_on_cocoeval_special_cases():
    dataset, results = edge_case_set()
    stats = both_engines(dataset, results, [1, 2, 3, 4, 5, 6])
    assert_equal_stats(stats)
    assert -1.0 not in stats["faster"][:3]  # areas all present: every summary is a number
    # a subset of the images (params.imgIds), and a single image
    assert_equal_stats(both_engines(dataset, results, [1, 3, 4]))
    assert_equal_stats(both_engines(dataset, results, [4]))


def test_crowd_detections_are_ignored_by_both():
    """Removing the detections inside the crowd region changes nothing: both engines ignore
    them (a false positive elsewhere would lower AP)."""
    dataset, results = edge_case_set()
    inside = (results[:, 0] == 1) & (results[:, 1] >= 400) & (results[:, 2] >= 300)
    assert inside.sum() == 2
    for engine in ENGINES:
        gt = GroundTruth(dataset)
        with_crowd = evaluate(gt, results, [1], engine).stats
        without = evaluate(gt, results[~inside], [1], engine).stats
        assert with_crowd == pytest.approx(without, abs=1e-12)


def test_eval_coco_is_validated():
    validate(compose_cfg("eval.coco=pycocotools"))
    assert compose_cfg().eval.coco == "faster"
    with pytest.raises(ConfigError, match=r"^eval\.coco='fast' is not valid; choose one of: "):
        validate(compose_cfg("eval.coco=fast"))


@pytest.mark.slow
def test_equal_stats_on_a_coco_val_sized_result():
    """5,000 images x 100 detections (37,925-like boxes): pycocotools takes minutes here."""
    dataset, results = coco_val_sized(images=5000, per_image=100, seed=0)
    assert results.shape == (500_000, 7)
    stats = both_engines(dataset, results, [img["id"] for img in dataset["images"]])
    assert_equal_stats(stats)
