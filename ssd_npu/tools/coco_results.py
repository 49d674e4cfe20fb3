"""A generated ground truth and detections the size of COCO val2017, for timing COCOeval.

`coco_val_sized(images=5000, per_image=100, seed=0)` -> (dataset, results): a COCO json dict
with 80 categories (COCO's ids, 1..90 with gaps), 640x480-like images, about 7.6 boxes per
image (37,925 over 5,000 images, as val2017) in COCO's mix of small, medium and large, crowd
regions (1%), ~2% images without objects; and `results [images * per_image, 7]`
(`ssd_npu.evaluation.records`) from `noisy_results`: per image, noisy copies of its boxes (some
with the wrong class) and random false positives, scores in (0, 1]. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
import torch

from ssd_npu.data.fit import FitInfo, unfit_boxes

# COCO's 80 category ids (1..90 with the gaps of instances_val2017.json)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
VAL2017_BOXES = 37925  # annotations in instances_val2017.json (5,000 images)
VAL2017_IMAGES = 5000


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
    # val2017's boxes per image; 2% of the images get none, the others make up for them
    counts = rng.poisson(VAL2017_BOXES / VAL2017_IMAGES / 0.98, images)
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


def loop_records(
    packed: torch.Tensor, scales: torch.Tensor, orig_sizes: torch.Tensor, image_ids: torch.Tensor
) -> list[dict]:
    """The records as evaluation built them before `ssd_npu.evaluation.records` (the reference
    for its test and the "before" of scripts/bench_eval.py): image by image `unfit_boxes`, then one
    dict per detection. Arguments as `ssd_npu.evaluation.records.packed_results`."""
    records = []
    for i in range(packed.shape[0]):
        if int(image_ids[i]) < 0:
            continue
        valid = packed[i, :, 6] > 0.5
        sx, sy = scales[i].tolist()
        info = FitInfo((sx, sy), tuple(orig_sizes[i].tolist()), (0, 0), False)
        boxes = unfit_boxes(packed[i, valid, :4], info).to(torch.float64)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = packed[i, valid, 4].tolist(), packed[i, valid, 5].tolist()
        image_id = int(image_ids[i])
        for b, score, c in zip(xywh, scores, labels, strict=True):
            records.append({"image_id": image_id, "category_id": int(c), "bbox": b, "score": score})
    return records


def as_packed(
    dataset: dict, results: np.ndarray, canvas: tuple[int, int] = (320, 320)
) -> tuple[torch.Tensor, ...]:
    """`results` [I * D, 7] (D rows per image, images in `dataset` order) as the fixed path's
    packed detections on a stretched canvas: (packed [I, D, 7] canvas pixels, scales [I, 2],
    orig_sizes [I, 2], image_ids [I]), the arguments of
    `ssd_npu.evaluation.records.packed_results`."""
    images = len(dataset["images"])
    rows = torch.from_numpy(results).reshape(images, -1, 7)
    orig_sizes = torch.tensor([[img["height"], img["width"]] for img in dataset["images"]])
    h, w = canvas
    scales = torch.stack([w / orig_sizes[:, 1], h / orig_sizes[:, 0]], dim=1).float()
    xyxy = torch.cat([rows[..., 1:3], rows[..., 1:3] + rows[..., 3:5]], dim=-1)
    packed = torch.cat(
        [
            xyxy * scales[:, None, [0, 1, 0, 1]].double(),
            rows[..., 5:6],
            rows[..., 6:7],
            torch.ones_like(rows[..., :1]),
        ],
        dim=-1,
    ).float()
    return packed, scales, orig_sizes, rows[:, 0, 0].long()
