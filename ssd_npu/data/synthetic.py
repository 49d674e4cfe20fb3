"""A small, deterministic COCO-format data set of coloured shapes on noisy backgrounds.

Layout written under `root` (the same as COCO 2017, so the same reader serves both):
`train2017/*.jpg`, `val2017/*.jpg`, `annotations/instances_{train,val}2017.json`.
Five categories (ids 1..5, so `num_classes=6` with background 0), each a distinct shape
AND colour. It is made to be learnt by an SSDLite from scratch within the default run:
1-5 objects per image that do not overlap, most of them 1/5 to 1/2 of the image's short side
(the sizes SSDLite's anchors cover), on a lightly textured background. It still exercises
every branch of the reader: image sides 160-800 px at aspect ratios up to 2.5, grayscale
('L') and CMYK JPEGs, images without objects, crowd regions (iscrowd=1, uncompressed RLE),
and in the train split one image with more objects than the default max_boxes and a few
objects below the smallest anchor. Bit-for-bit deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # the config schema, for the annotation only (data does not import config)
    from ssd_npu.config import SyntheticConfig

CATEGORIES = [
    {"id": 1, "name": "red_circle", "supercategory": "shape"},
    {"id": 2, "name": "green_square", "supercategory": "shape"},
    {"id": 3, "name": "blue_triangle", "supercategory": "shape"},
    {"id": 4, "name": "yellow_diamond", "supercategory": "shape"},
    {"id": 5, "name": "magenta_ring", "supercategory": "shape"},
]
_COLOURS = {
    1: (220, 30, 30),
    2: (30, 200, 40),
    3: (40, 60, 230),
    4: (235, 220, 30),
    5: (220, 40, 220),
}
MIN_SIDE, MAX_SIDE = 160, 800
MAX_ASPECT = 2.5  # w/h and h/w at most this
MAX_OBJECTS = 5  # objects per ordinary image (1..5)
# objects in train image 9, the one crowded image: more than the default max_boxes. One only:
# its 32 forced matches of tiny boxes double the box loss of any batch it joins.
CROWDED_OBJECTS = 40
TINY_EVERY = 48  # one train object in this many is below SSDLite's smallest anchor
# Bumped whenever the generator draws different images: the cache folder carries it, so a
# changed generator never reuses a stale set.
GENERATOR_VERSION = 4
_REPO = Path(__file__).resolve().parents[2]


def _polygon(cat: int, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of one shape of half-size r px centred at (cx, cy), in image pixels."""
    if cat in (1, 5):  # circle / ring outline: a 24-gon is close enough for COCO polygons
        return [
            (cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24))
            for k in range(24)
        ]
    if cat == 2:
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if cat == 3:
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def _shoelace(pts: list[tuple[float, float]]) -> float:
    xs, ys = np.array(pts).T
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a bool mask [h, w]: column-major runs, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Low-saturation gradient plus pixel noise plus a few grey lines: texture, but no target
    colours and no outline that reads as one of the shapes."""
    base = rng.integers(60, 180)
    tint = rng.integers(-20, 21, size=3)
    ramp = np.linspace(-30, 30, w)[None, :, None] * rng.choice([-1, 1])
    noise = rng.normal(0, 12, size=(h, w, 1)) + rng.normal(0, 4, size=(h, w, 3))
    arr = np.clip(base + tint + ramp + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # distractors: grey lines
        g = int(rng.integers(40, 220))
        x0, x1 = sorted(rng.uniform(0, w, 2).tolist())
        y0, y1 = sorted(rng.uniform(0, h, 2).tolist())
        draw.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=int(rng.integers(1, 4)))
    return img


def _draw_object(draw, rng, cat, cx, cy, r, img_id, ann_id, w, h) -> dict[str, Any]:
    pts = _polygon(cat, cx, cy, r)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[cat])
    if cat == 5:  # ring: outline only, thick enough to see at 8 px
        width = max(2, int(r / 2.5))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
        area = math.pi * (r**2 - (r - width) ** 2)
    else:
        draw.polygon(pts, fill=colour)
        area = _shoelace(pts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(w), max(xs)), min(float(h), max(ys))
    seg = [[round(v, 2) for p in pts for v in (min(max(p[0], 0), w), min(max(p[1], 0), h))]]
    return {
        "id": ann_id,
        "image_id": img_id,
        "category_id": cat,
        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        "area": round(area, 2),
        "iscrowd": 0,
        "segmentation": seg,
    }


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(w, h): width log-uniform in [MIN_SIDE, MAX_SIDE], aspect w/h log-uniform in [1/2.5, 2.5]."""
    w = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    h = w / math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    return int(round(w)), int(round(min(max(h, MIN_SIDE), MAX_SIDE)))


def _free_spot(
    rng: np.random.Generator, r: float, w: int, h: int, taken: list[tuple[float, ...]]
) -> tuple[float, float] | None:
    """A centre for a shape of half-size r whose box does not overlap any box in `taken`
    (x0, y0, x1, y1), or None after 30 tries: occluded shapes would teach the model nothing."""
    for _ in range(30):
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        if all(cx + r <= a or cx - r >= c or cy + r <= b or cy - r >= d for a, b, c, d in taken):
            return cx, cy
    return None


def _object_sizes(rng: np.random.Generator, short: int, n: int, tiny: bool) -> list[float]:
    """Half-sizes (px) of n objects, largest first (placed first, so they always fit).

    Most span 1/5 to 1/2 of the short side (log-uniform): on the demo's 224 canvas from a
    square image 45-112 px, the sizes SSDLite's anchors (45 px and up at 224) match. One in
    TINY_EVERY is 8-16 px, below the smallest anchor (when `tiny`), so the small-object branch
    of matching stays.
    """
    sides = [
        rng.uniform(8, 16)
        if tiny and rng.random() < 1 / TINY_EVERY
        else math.exp(rng.uniform(math.log(short / 5), math.log(short / 2)))
        for _ in range(n)
    ]
    return sorted((s / 2 for s in sides), reverse=True)


def _make_split(root: Path, split: str, num: int, seed: int, id_base: int, train: bool) -> None:
    """Write `num` images and their annotations. The crowded image and the objects below the
    smallest anchor appear in the train split only: they are there for the reader, truncation
    and matching, and in the val split they would only cap the mAP any SSDLite can reach."""
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num):
        # one generator per image: the data set does not depend on generation order
        rng = np.random.default_rng([seed, id_base, i])
        w, h = _image_size(rng)
        img_id, name = id_base + i + 1, f"{id_base + i + 1:012d}.jpg"
        img = _background(rng, h, w)
        draw = ImageDraw.Draw(img)
        taken: list[tuple[float, ...]] = []
        if i % 8 == 5:  # every 8th image has no objects
            radii = []
        elif train and i == 9:  # the crowded image: more boxes than max_boxes=32
            radii = [min(w, h) / 24] * CROWDED_OBJECTS
        else:
            n = int(rng.integers(1, MAX_OBJECTS + 1))
            radii = _object_sizes(rng, min(w, h), n, tiny=train)
        for r in radii:
            spot = _free_spot(rng, r, w, h, taken)
            if spot is None:
                continue
            cx, cy = spot
            taken.append((cx - r, cy - r, cx + r, cy + r))
            cat = int(rng.integers(1, 6))
            anns.append(_draw_object(draw, rng, cat, cx, cy, r, img_id, len(anns) + 1, w, h))
        if i % 6 == 3:  # a crowd: a tight cluster of small shapes, one iscrowd=1 region
            cat, r = int(rng.integers(1, 6)), 4.0
            bw, bh = min(w // 3, 90), min(h // 3, 90)
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            for yy in range(y0 + 5, y0 + bh - 4, 10):
                for xx in range(x0 + 5, x0 + bw - 4, 10):
                    draw.polygon(_polygon(cat, xx, yy, r), fill=_COLOURS[cat])
            mask = np.zeros((h, w), bool)
            mask[y0 : y0 + bh, x0 : x0 + bw] = True
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "bbox": [float(x0), float(y0), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 1,
                    "segmentation": _rle(mask),
                }
            )
        if i % 16 == 2:  # grayscale JPEG: the reader must convert to RGB
            img.convert("L").save(root / split / name, quality=90)
        elif i == 1:  # CMYK JPEG
            img.convert("CMYK").save(root / split / name, quality=90)
        else:
            img.save(root / split / name, quality=90)
        images.append({"id": img_id, "file_name": name, "width": w, "height": h})
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}.json").write_text(json.dumps(data))


def make_synthetic_coco(root: Path, num_train: int = 256, num_val: int = 48, seed: int = 0) -> Path:
    """Write the data set under `root` (created if needed) and return `root`."""
    root = Path(root)
    _make_split(root, "train2017", num_train, seed, id_base=0, train=True)
    # val ids start at 1e6 so train and val image ids never collide
    _make_split(root, "val2017", num_val, seed, id_base=1_000_000, train=False)
    return root


def ensure_synthetic_coco(root: Path | None, cfg_synthetic: SyntheticConfig) -> Path:
    """Return the data set folder for these parameters, generating it on first use only.

    `root=None` means `<repo>/.cache/synthetic_coco`. The data lives in a subfolder named by
    (num_train, num_val, seed), so a changed config never reuses stale data. Generation goes
    into a temporary folder beside it and is moved in with `os.replace`, so a crash leaves no
    half-written set and two racing processes both end up with one complete copy.
    """
    n_tr, n_va, seed = (
        int(cfg_synthetic.num_train),
        int(cfg_synthetic.num_val),
        int(cfg_synthetic.seed),
    )
    parent = Path(root) if root is not None else _REPO / ".cache" / "synthetic_coco"
    final = parent / f"v{GENERATOR_VERSION}_train{n_tr}_val{n_va}_seed{seed}"
    if (final / "DONE").exists():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{uuid.uuid4().hex[:8]}.", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any data folder
    try:
        make_synthetic_coco(tmp, n_tr, n_va, seed)
        (tmp / "DONE").write_text("complete\n")  # written last: marks a finished set
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "DONE").exists():  # not a lost race: a real problem
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
