"""The synthetic COCO-format data set: deterministic, loadable, and covering every reader branch."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssd_npu.data.synthetic import MAX_SIDE, MIN_SIDE, ensure_synthetic_coco, make_synthetic_coco

# pycocotools' mask decoding trips a numpy 2 deprecation warning; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic(tiny_coco, tmp_path):
    again = make_synthetic_coco(tmp_path / "again", num_train=12, num_val=6, seed=0)
    assert _files(again) == _files(tiny_coco)
    other = make_synthetic_coco(tmp_path / "other", num_train=12, num_val=6, seed=1)
    assert _files(other) != _files(tiny_coco)


def test_layout_and_pycocotools(tiny_coco):
    for split, n in (("train2017", 12), ("val2017", 6)):
        coco = COCO(str(tiny_coco / "annotations" / f"instances_{split}.json"))
        assert len(coco.imgs) == n and sorted(coco.cats) == [1, 2, 3, 4, 5]
        names = {c["name"] for c in coco.cats.values()}
        assert len(names) == 5
        for img in coco.imgs.values():
            path = tiny_coco / split / img["file_name"]
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
            assert MIN_SIDE <= img["width"] <= MAX_SIDE and MIN_SIDE <= img["height"] <= MAX_SIDE
        for ann in coco.anns.values():
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and ann["area"] > 0 and ann["category_id"] in coco.cats
            assert (
                x >= 0 and y >= 0 and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            )
            mask = coco.annToMask(ann)  # segmentation (polygon or RLE) is readable
            assert mask.shape == (img["height"], img["width"]) and mask.sum() > 0
            if not ann["iscrowd"]:
                assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6


def test_variety(tiny_coco):
    data = json.loads((tiny_coco / "annotations" / "instances_train2017.json").read_text())
    per_image = {img["id"]: 0 for img in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
    assert min(per_image.values()) == 0  # an image with no annotations
    assert any(a["iscrowd"] == 1 for a in data["annotations"])
    modes = {Image.open(tiny_coco / "train2017" / i["file_name"]).mode for i in data["images"]}
    assert {"L", "CMYK", "RGB"} <= modes
    ratios = {round(i["width"] / i["height"], 1) for i in data["images"]}
    assert len(ratios) > 5


def test_ensure_caches_by_parameters(tmp_path):
    cfg = SimpleNamespace(num_train=3, num_val=2, seed=4)
    root = ensure_synthetic_coco(tmp_path, cfg)
    assert root.parent == tmp_path and (root / "annotations" / "instances_val2017.json").is_file()
    stamp = (root / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    assert ensure_synthetic_coco(tmp_path, cfg) == root  # second call reuses
    assert (root / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp
    other = ensure_synthetic_coco(tmp_path, SimpleNamespace(num_train=3, num_val=2, seed=5))
    assert other != root
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _ensure(root: str) -> str:
    return str(ensure_synthetic_coco(Path(root), SimpleNamespace(num_train=6, num_val=2, seed=0)))


def test_ensure_two_processes_race(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        a, b = pool.map(_ensure, [str(tmp_path)] * 2)
    assert a == b and (Path(a) / "DONE").is_file()
    assert len(list((Path(a) / "train2017").glob("*.jpg"))) == 6
    assert [p.name for p in tmp_path.iterdir()] == [Path(a).name]  # loser's temp dir removed
