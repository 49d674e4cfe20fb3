"""A COCO-format set of real-world-sized, photo-like JPEGs for host pipeline benchmarks.

Usage:
    python scripts/make_photo_coco.py OUT_DIR [--train 120] [--val 24] [--seed 0] [--processes N]

Writes the COCO 2017 layout under OUT_DIR (`annotations/instances_{train,val}2017.json`,
`train2017/`, `val2017/`), so `data=coco data.root=OUT_DIR data.num_classes=91` reads it.
Why not the synthetic set: its sides vary from 160 to 800 px over a flat noisy background,
so decode and resize costs differ from COCO's. Here sizes follow COCO (mostly 640x480 and
480x640, some 640x427 / 500x375 / 612x612 / 640x360) and the content is photo-like: 1/f
(fractal) low-frequency structure, lighting gradients, textured objects with sharp edges,
and mild sensor noise, saved at JPEG quality 90 with 4:2:0 chroma (COCO's usual encoding):
about 100-200 KB per 640x480 file, the entropy that sets a JPEG decoder's cost.
Boxes: COCO's statistics: 1 to 40 per image (geometric, mean 7.3), 41% small (< 32^2 px),
34% medium, 25% large (> 96^2 px), aspect ratios 1/3 to 3, COCO category ids 1..90. Bit-for-bit deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (w, h) and weight: COCO's most frequent sizes
SIZES = [((640, 480), 6), ((480, 640), 3), ((640, 427), 2), ((500, 375), 1), ((612, 612), 1),
         ((640, 360), 1)]  # fmt: skip
CATEGORY_IDS = [1, 2, 3, 4, 6, 8, 15, 17, 18, 44, 47, 62, 64, 67, 72, 84, 90]


def _fractal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """1/f noise [h, w, 3] float in about [-1, 1]: octaves of smoothly upsampled random fields."""
    out = np.zeros((h, w, 3), np.float32)
    for octave in range(1, 10):
        cells = 2**octave
        small = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        layer = np.stack(
            [
                np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC))
                for c in range(3)
            ],
            axis=-1,
        )
        out += layer / octave  # amplitude ~ 1/frequency
    return out / 2.5


def _photo(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, list[list[float]]]:
    """One photo-like RGB image and its object boxes [x, y, w, h] (COCO xywh, pixels)."""
    palette = rng.uniform(40, 200, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 40 * np.cos(rng.uniform(0, math.pi)) * (xx / w - 0.5) + 30 * (yy / h - 0.5)
    arr = palette + 60 * _fractal(rng, h, w) + light[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    boxes = []
    for _ in range(min(40, int(rng.geometric(1 / 7.3)))):
        # COCO's mix of object sizes: 41% small (< 32^2 px), 34% medium, 25% large (> 96^2)
        lo, hi = [(4, 32), (32, 96), (96, 0.9 * min(w, h))][
            int(rng.choice(3, p=[0.41, 0.34, 0.25]))
        ]
        side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        bw, bh = min(side * math.sqrt(aspect), w - 1.0), min(side / math.sqrt(aspect), h - 1.0)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=colour)
        boxes.append([round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)])
    # texture over objects and background alike (objects are not flat), then sensor noise
    img = img.filter(ImageFilter.GaussianBlur(0.7))
    detail = (
        36 * _fractal(rng, h, w) + rng.normal(0, 13.0, (h, w, 1)) + rng.normal(0, 5.0, (h, w, 3))
    )
    arr = np.asarray(img, np.float32) + detail
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), boxes


def _one(root: Path, split: str, seed: int, id_base: int, i: int) -> tuple[dict, list[dict]]:
    """Write image `i` of a split; its image record and its annotations (ids filled later).
    Everything it draws comes from its own generator (seed, split, index): the result does
    not depend on which process writes it, or in what order."""
    sizes = [s for s, k in SIZES for _ in range(k)]
    rng = np.random.default_rng([seed, id_base, i])
    w, h = sizes[i % len(sizes)]
    img, boxes = _photo(rng, w, h)
    img_id, name = id_base + i + 1, f"{id_base + i + 1:012d}.jpg"
    img.save(root / split / name, quality=90, subsampling="4:2:0")
    anns = [
        {
            "image_id": img_id,
            "category_id": int(rng.choice(CATEGORY_IDS)),
            "bbox": b,
            "area": round(b[2] * b[3], 2),
            "iscrowd": 0,
        }
        for b in boxes
    ]
    return {"id": img_id, "file_name": name, "width": w, "height": h}, anns


def _one_star(args: tuple) -> tuple[dict, list[dict]]:
    return _one(*args)


def _split(root: Path, split: str, num: int, seed: int, id_base: int, processes: int = 1) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    jobs = [(root, split, seed, id_base, i) for i in range(num)]
    if processes > 1 and num > 1:
        # images in parallel (a 640x480 photo takes ~0.1 s of one core); map keeps the order
        with ProcessPoolExecutor(processes) as pool:
            done = list(pool.map(_one_star, jobs, chunksize=max(1, num // (4 * processes))))
    else:
        done = [_one(*job) for job in jobs]
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for image, boxes in done:
        images.append(image)
        for ann in boxes:
            anns.append({"id": len(anns) + 1, **ann})
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def make_photo_coco(
    root: Path, num_train: int = 120, num_val: int = 24, seed: int = 0, processes: int = 1
) -> Path:
    """Write the set under `root` (created if needed) and return `root`. `processes` > 1
    writes the images in that many processes: the same bytes as one process."""
    root = Path(root)
    _split(root, "train2017", num_train, seed, 0, processes)
    _split(root, "val2017", num_val, seed, 1_000_000, processes)
    return root


MANIFEST = "photo_set.json"


def ensure_photo_coco(
    root: Path, num_train: int, num_val: int = 24, seed: int = 0, processes: int | None = None
) -> tuple[Path, bool]:
    """The set under `root`, written only when it is not there already: (root, written).

    A manifest (`photo_set.json`: the counts and the seed) is written last, after every
    image and both annotation files, so a set whose writing was interrupted has none and is
    written anew; a set made with other counts or another seed is replaced.
    """
    root = Path(root)
    want = {"num_train": num_train, "num_val": num_val, "seed": seed, "version": 1}
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == want:
                return root, False
        except ValueError:
            pass  # a torn manifest: write the set again
    if root.exists():
        shutil.rmtree(root)
    make_photo_coco(root, num_train, num_val, seed, processes or os.cpu_count() or 1)
    manifest.write_text(json.dumps(want))
    return root, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--val", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="images written in parallel")
    args = parser.parse_args()
    root = make_photo_coco(args.out, args.train, args.val, args.seed, args.processes)
    print(f"wrote {args.train} train + {args.val} val images under {root}")


if __name__ == "__main__":
    main()
