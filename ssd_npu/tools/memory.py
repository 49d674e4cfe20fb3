"""Memory of a data set in forked readers: the data-set memory benchmark and its test.

A DataLoader worker is a fork of the main process: its pages are shared until written, and
reading a Python object writes its reference count, so a worker that reads a data set of
Python objects (a pycocotools index) slowly copies it. `fork_readers` forks readers that each
read their share of one epoch of targets (no image decoding) and reports each one's private
memory after it. `CocoIndexTargets` is the previous reader (pycocotools index, per-annotation
dicts), kept as the benchmark's baseline and the reference of the identity test.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools.coco import COCO

from ssd_npu.data.coco import target_from_xywh

if TYPE_CHECKING:
    from ssd_npu.data.coco import CocoDetectionDataset


def _smaps_kb(fields: tuple[str, ...], pid: int | str = "self") -> int:
    """Sum of `fields` (kB) in /proc/<pid>/smaps_rollup (Linux)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            total += int(rest.split()[0])
    return total


def private_mb(pid: int | str = "self") -> float:
    """Memory only this process holds (Private_Clean + Private_Dirty), MB (2**20 bytes)."""
    return _smaps_kb(("Private_Clean", "Private_Dirty"), pid) / 1024


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size, MB: shared pages included."""
    return _smaps_kb(("Rss",), pid) / 1024


def fork_readers(
    read: Callable[[int], object], n: int, workers: int, freeze: bool = True
) -> list[float]:
    """Fork `workers` readers; reader k calls read(i) for i = k, k + workers, ... < n (its share
    of one epoch, as a DataLoader worker's); return each one's private MB after its share.

    freeze: gc.freeze() first, as the training loader's workers do (`_worker_init`).
    """
    readers = []
    for k in range(workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the reader: never returns into the caller's code
            code = 1
            try:
                os.close(r)
                if freeze:
                    gc.freeze()
                for i in range(k, n, workers):
                    read(i)
                os.write(w, f"{private_mb():.3f}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        readers.append((pid, r))
    result = []
    for pid, r in readers:
        with os.fdopen(r, "rb") as f:
            text = f.read().decode()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not text:
            raise RuntimeError(f"reader {pid} failed (wait status {status})")
        result.append(float(text))
    return result


class CocoIndexTargets:
    """The previous training reader's targets: a pycocotools index of the whole file, and per
    image a list of annotation dicts (the code `CocoDetectionDataset` had before it kept flat
    arrays). `target(index, h, w)` returns the same dict `CocoDetectionDataset.target` does."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path) -> None:
        self.coco = COCO()
        self.coco.dataset = json.loads(Path(ann_file).read_text())
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.ids: list[int] = sorted(self.coco.imgs)
        self.img_dir = Path(img_dir)

    def path(self, index: int) -> Path:
        return self.img_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def target(self, index: int, h: int, w: int) -> dict[str, Any]:
        img_id = self.ids[index]
        # the per-annotation Python objects of the COCO index: what this baseline measures
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
        return target_from_xywh(xywh, labels, int(img_id), h, w)

    def read(self, index: int) -> None:
        """One epoch step of a worker without decoding: the file's path and size, the target."""
        img = self.coco.imgs[self.ids[index]]
        self.path(index)
        self.target(index, int(img["height"]), int(img["width"]))


def read_flat(dataset: CocoDetectionDataset, index: int) -> None:
    """The same epoch step on a `CocoDetectionDataset` (flat arrays): path, size, target."""
    dataset.img_dir / str(dataset.file_names[index])
    h, w = dataset.sizes[index]
    dataset.target(index, int(h), int(w))


# COCO's most frequent image sizes (w, h) and category ids (80 of 1..90)
_SIZES = np.array([(640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (640, 360)])
_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_coco_like(
    path: str | Path,
    num_images: int,
    file_names: list[str],
    mean_boxes: float = 7.6,
    polygon_coords: int = 66,
    seed: int = 0,
) -> int:
    """Write a COCO instances file shaped like train2017; return its annotation count.

    num_images entries whose file_name cycles over `file_names` (a few real JPEGs stand for
    all); per image a geometric number of boxes (mean `mean_boxes`; train2017: 118,287 images,
    7.6 boxes each), about 1% crowd, some reaching outside the image and some empty; each with
    a segmentation polygon of `polygon_coords` numbers, as COCO's (train2017's 448 MB of
    polygons are what the pycocotools index holds and training never reads). The defaults
    give about 527 MB at train2017's size. Written as text line by line: fast, and without
    holding the whole structure in memory.
    """
    rng = np.random.default_rng(seed)
    size = _SIZES[rng.choice(len(_SIZES), num_images, p=[0.45, 0.2, 0.15, 0.08, 0.07, 0.05])]
    counts = rng.geometric(1 / (mean_boxes + 1), num_images) - 1
    n = int(counts.sum())
    img = np.repeat(np.arange(num_images), counts)
    wh = rng.uniform(0.02, 0.6, (n, 2)) * size[img]
    xy = rng.uniform(-0.05, 1.0, (n, 2)) * size[img] - wh * rng.uniform(0, 0.2, (n, 1))
    wh[rng.random(n) < 0.003] = 0.0  # empty boxes: dropped as degenerate
    crowd = rng.random(n) < 0.01
    cats = rng.choice(_CATEGORY_IDS, n)
    # a pool of polygons: their text is what costs, not their variety
    pool = [",".join(f"{v:.2f}" for v in rng.uniform(0, 640, polygon_coords)) for _ in range(512)]
    with open(path, "w") as f:
        f.write('{"info": {"description": "COCO-like"}, "licenses": [], "images": [')
        f.write(
            ",".join(
                f'{{"id": {i + 1}, "file_name": "{file_names[i % len(file_names)]}", '
                f'"width": {int(size[i, 0])}, "height": {int(size[i, 1])}}}'
                for i in range(num_images)
            )
        )
        f.write('], "annotations": [')
        for k in range(n):
            f.write(
                ("," if k else "")
                + f'{{"id": {k + 1}, "image_id": {int(img[k]) + 1}, "category_id": {cats[k]}, '
                f'"iscrowd": {int(crowd[k])}, "area": {wh[k, 0] * wh[k, 1]:.2f}, '
                f'"bbox": [{xy[k, 0]:.2f}, {xy[k, 1]:.2f}, {wh[k, 0]:.2f}, {wh[k, 1]:.2f}], '
                f'"segmentation": [[{pool[k % len(pool)]}]]}}'
            )
        f.write('], "categories": [')
        f.write(
            ",".join(f'{{"id": {c}, "name": "c{c}", "supercategory": "s"}}' for c in _CATEGORY_IDS)
        )
        f.write("]}")
    return n
