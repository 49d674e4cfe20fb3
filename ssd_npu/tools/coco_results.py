"""A generated ground truth and detections the size of COCO val2017, for timing COCOeval.

`coco_val_sized(images=5000, per_image=100, seed=0)` -> (dataset, results): a COCO json dict
with 80 categories (COCO's ids, 1..90 with gaps), 640x480-like images, about 7.6 boxes per
image (37,925 over 5,000 images, as val2017) in COCO's mix of small, medium and large, crowd
regions (1%), ~2% images without objects; and `results [images * per_image, 7]`
(`ssd_npu.records`) from `noisy_results`: per image, noisy copies of its boxes (some with the
wrong class) and random false positives, scores in (0, 1]. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

# COCO's 80 category ids (1..90 with the gaps of instances_val2017.json)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
VAL2017_BOXES = 37925  # annotations in instances_val2017.json (5,000 images)


def _boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n xywh boxes inside an h x w image, sides drawn log-uniform (small to large)."""
    side = np.exp(rng.uniform(np.log(4.0), np.log(0.9 * min(h, w)), (n, 2)))
    x = rng.uniform(0, w - side[:, 0])
    y = rng.uniform(0, h - side[:, 1])
    return np.stack([x, y, side[:, 0], side[:, 1]], axis=1)


def noisy_results(dataset: dict, per_image: int, seed: int = 0) -> np.ndarray:
    """Detections for the ground truth `dataset` (a COCO json dict): per image, noisy copies
    of its boxes (20% with a random class of the set) and random false positives, `per_image`
    rows in all, scores in (0, 1] rounded to 1e-4 (so some tie). [images * per_image, 7]."""
    rng = np.random.default_rng(seed)
    cats = np.array(sorted(c["id"] for c in dataset["categories"]))
    per: dict[int, list[dict]] = {img["id"]: [] for img in dataset["images"]}
    for ann in dataset["annotations"]:
        per[ann["image_id"]].append(ann)
    rows = []
    for img in dataset["images"]:  # a generator, not a timed path: clarity over speed
        anns = per[img["id"]][:per_image]
        hits = len(anns)
        gt = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        gt_cats = np.array([a["category_id"] for a in anns], dtype=np.int64)
        det = np.zeros((per_image, 7))
        det[:, 0] = img["id"]
        noise = rng.normal(0, 0.08, (hits, 4)) * np.repeat(gt[:, 2:], 2, axis=1)
        det[:hits, 1:5] = gt + noise
        det[:hits, 6] = np.where(rng.random(hits) < 0.8, gt_cats, rng.choice(cats, hits))
        det[hits:, 1:5] = _boxes(rng, per_image - hits, img["height"], img["width"])
        det[hits:, 6] = rng.choice(cats, per_image - hits)
        det[:, 3:5] = np.maximum(det[:, 3:5], 1.0)
        det[:, 5] = np.round(rng.beta(2, 5, per_image), 4) + 1e-4
        det[:hits, 5] = np.minimum(det[:hits, 5] + 0.3, 1.0)
        rows.append(det[np.argsort(-det[:, 5], kind="stable")])
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def coco_val_sized(
    images: int = 5000, per_image: int = 100, seed: int = 0
) -> tuple[dict, np.ndarray]:
    """(COCO json dict, results [images * per_image, 7] float64); see the module docstring."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(VAL2017_BOXES / images / 0.98, images)
    counts[rng.random(images) < 0.02] = 0  # images without objects
    sizes = np.where(rng.random((images, 1)) < 0.7, [[480, 640]], [[640, 480]])
    imgs, anns = [], []
    cats = np.array(COCO_IDS)
    for i in range(images):
        image_id = i + 1
        h, w = (int(v) for v in sizes[i])
        imgs.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"})
        for box in _boxes(rng, int(counts[i]), h, w):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(cats)),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
    categories = [{"id": int(c), "name": f"class{c}", "supercategory": "x"} for c in COCO_IDS]
    dataset = {"images": imgs, "annotations": anns, "categories": categories}
    return dataset, noisy_results(dataset, per_image, seed + 1)
