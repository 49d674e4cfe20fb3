"""COCO reader: RGB conversion, target cleaning, and a DataError for each fixable problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

import ssd_npu.data.coco as coco_module
from ssd_npu.build import build_training
from ssd_npu.data.box_table import box_table, load_coco
from ssd_npu.data.coco import CocoDetectionDataset, check_num_classes
from ssd_npu.data.transforms import train_augmentation
from ssd_npu.errors import DataError
from ssd_npu.tools.memory import CocoIndexTargets

CATS = [{"id": 1, "name": "a", "supercategory": "s"}, {"id": 3, "name": "b", "supercategory": "s"}]


def _write_set(root: Path, images: dict[str, Image.Image], anns: list[dict], cats=CATS) -> Path:
    """A 'val' split with the given files (name -> PIL image) and annotations."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for i, (name, img) in enumerate(images.items(), start=1):
        img.save(root / "val" / name, quality=90) if name.endswith(".jpg") else img.save(
            root / "val" / name
        )
        entries.append({"id": i, "file_name": name, "width": img.size[0], "height": img.size[1]})
    for k, a in enumerate(anns, start=1):
        a.setdefault("id", k)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    data = {"images": entries, "annotations": anns, "categories": cats}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def _rgb(w=64, h=48) -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture()
def modes_set(tmp_path):
    images = {
        "rgb.jpg": _rgb(),
        "gray.jpg": _rgb().convert("L"),
        "cmyk.jpg": _rgb().convert("CMYK"),
        "pal.png": _rgb().convert("P"),
        "rgba.png": _rgb().convert("RGBA"),
    }
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 10.0]},
        {"image_id": 1, "category_id": 3, "bbox": [50.0, 40.0, 30.0, 30.0]},  # clipped to 64x48
        {"image_id": 1, "category_id": 3, "bbox": [70.0, 10.0, 5.0, 5.0]},  # outside: degenerate
        {"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 0.0, 8.0]},  # zero width: degenerate
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 30.0, 30.0], "iscrowd": 1},
        {"image_id": 2, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "iscrowd": 1},  # only crowd
    ]
    return _write_set(tmp_path / "modes", images, anns)


def test_rgb_conversion(modes_set):
    ds = CocoDetectionDataset(modes_set, "val")
    assert len(ds) == 5 and ds.ids == [1, 2, 3, 4, 5]
    for i in range(len(ds)):
        image, target = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == (3, 48, 64) and target["orig_size"] == (48, 64)
    # grayscale: three equal channels
    image, _ = ds[1]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_targets_clipped_crowd_excluded_degenerate_counted(modes_set):
    ds = CocoDetectionDataset(modes_set, "val")
    _, t = ds[0]
    assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].canvas_size == (48, 64)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    torch.testing.assert_close(
        t["boxes"].as_subclass(torch.Tensor),
        torch.tensor([[10.0, 5.0, 30.0, 15.0], [50.0, 40.0, 64.0, 48.0]]),
    )
    assert t["labels"].tolist() == [1, 3] and t["degenerate"] == 2 and t["image_id"] == 1
    assert t["clipped"] == 1  # the box reaching past 64x48 is kept, clipped and counted
    _, t = ds[1]  # only a crowd annotation: kept, no boxes
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["degenerate"] == 0
    assert ds.category_ids == [1, 3] and ds.max_category_id == 3
    check_num_classes(ds, 4)
    with pytest.raises(DataError, match=r"data.num_classes=3 is too small for category id 3"):
        check_num_classes(ds, 3)
    assert ds.coco.getImgIds() == ds.ids


def test_augmentation_keeps_uint8_and_handles_empty(modes_set):
    ds = CocoDetectionDataset(modes_set, "val", transforms=train_augmentation())
    torch.manual_seed(0)
    for _ in range(5):
        for i in range(2):
            image, t = ds[i]
            assert image.dtype == torch.uint8 and t["boxes"].shape[0] == t["labels"].shape[0]


def test_missing_root_and_annotation(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        CocoDetectionDataset(tmp_path / "nope", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"instances_val\.json does not exist"):
        CocoDetectionDataset(tmp_path / "empty", "val")


def test_malformed_json(tmp_path):
    root = _write_set(tmp_path / "bad", {"a.jpg": _rgb()}, [])
    ann = root / "annotations" / "instances_val.json"
    ann.write_text(ann.read_text()[:-20])  # truncated file
    with pytest.raises(DataError, match=r"instances_val\.json is not valid JSON"):
        CocoDetectionDataset(root, "val")
    ann.write_text('{"images": []}')
    with pytest.raises(DataError, match=r"instances_val\.json lacks the COCO keys"):
        CocoDetectionDataset(root, "val")


def test_unknown_category(tmp_path):
    anns = [{"image_id": 1, "category_id": 7, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    root = _write_set(tmp_path / "cat", {"a.jpg": _rgb()}, anns)
    with pytest.raises(DataError, match=r"instances_val\.json: annotation 1 has category_id 7"):
        CocoDetectionDataset(root, "val")


def test_missing_image_file(tmp_path):
    anns = [{"image_id": 2, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    root = _write_set(tmp_path / "miss", {"a.jpg": _rgb(), "b.jpg": _rgb()}, anns)
    (root / "val" / "b.jpg").unlink()
    ds = CocoDetectionDataset(root, "val")
    with pytest.raises(DataError, match=r"b\.jpg \(image_id 2\) is missing"):
        ds[1]


def test_truncated_jpeg_fail_and_skip(tmp_path):
    images = {"a.jpg": _rgb(), "b.jpg": _rgb(), "c.jpg": _rgb()}
    anns = [{"image_id": 3, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    root = _write_set(tmp_path / "trunc", images, anns)
    path = root / "val" / "b.jpg"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"b\.jpg \(image_id 2\) cannot be decoded"):
        CocoDetectionDataset(root, "val")[1]
    ds = CocoDetectionDataset(root, "val", on_bad_image="skip")
    with pytest.warns(UserWarning, match="b.jpg"):
        image, t = ds[1]
    assert (
        t["image_id"] == 3 and t["skipped"] == 1 and ds.skipped == 1 and t["labels"].tolist() == [1]
    )
    assert ds[0][1]["skipped"] == 0


def test_annotation_for_unknown_image(tmp_path):
    anns = [{"image_id": 9, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    root = _write_set(tmp_path / "img", {"a.jpg": _rgb()}, anns)
    with pytest.raises(DataError, match=r"instances_val\.json: annotation 1 points to image_id 9"):
        CocoDetectionDataset(root, "val")


def _same_target(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
            if isinstance(want[k], tv_tensors.BoundingBoxes):
                assert got[k].canvas_size == want[k].canvas_size
        else:
            assert got[k] == want[k] and type(got[k]) is type(want[k]), k


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_flat_targets_equal_the_pycocotools_reader_synthetic(tiny_coco, split):
    ds = CocoDetectionDataset(tiny_coco, split)
    ref = CocoIndexTargets(ds.ann_file, ds.img_dir)
    assert ds.ids == ref.ids
    for i in range(len(ds)):
        image, t = ds[i]  # the decoded size, as training reads it
        h, w = t["orig_size"]
        _same_target({k: v for k, v in t.items() if k != "skipped"}, ref.target(i, h, w))
        for size in ((h // 2, w // 3), (h, w // 2)):  # smaller: more clipped and degenerate
            _same_target(ds.target(i, *size), ref.target(i, *size))


def test_flat_targets_equal_the_pycocotools_reader_crowd_degenerate_outside(tmp_path):
    anns = [  # file order interleaves images: grouping must keep each image's order
        {"image_id": 2, "category_id": 3, "bbox": [1.5, 2.25, 3.1, 4.7]},
        {"image_id": 1, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 10.0]},
        {"image_id": 2, "category_id": 1, "bbox": [0.1, 0.2, 100.3, 7.0]},  # outside: clipped
        {"image_id": 1, "category_id": 3, "bbox": [50.0, 40.0, 30.0, 30.0]},
        {"image_id": 1, "category_id": 3, "bbox": [70.0, 10.0, 5.0, 5.0]},  # outside: degenerate
        {"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 0.0, 8.0]},  # zero width
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 30.0, 30.0], "iscrowd": 1},
        {"image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "iscrowd": 1},
        {"image_id": 2, "category_id": 3, "bbox": [-4.0, -3.0, 10.0, 9.0]},  # negative corner
        {"image_id": 2, "category_id": 1, "bbox": [33.333333333, 1e-9, 0.1, 1e-7]},  # rounding
    ]
    root = _write_set(tmp_path / "edge", {"a.jpg": _rgb(), "b.png": _rgb(), "c.jpg": _rgb()}, anns)
    ds = CocoDetectionDataset(root, "val")
    ref = CocoIndexTargets(ds.ann_file, ds.img_dir)
    assert ds.ids == ref.ids == [1, 2, 3]
    for i in range(3):
        for size in ((48, 64), (20, 30), (5, 3)):
            _same_target(ds.target(i, *size), ref.target(i, *size))
    assert ds.box_counts.tolist() == box_table(ref.coco).counts.tolist() == [2, 4, 0]


def test_training_set_keeps_flat_arrays_and_parses_once(tiny_cfg, monkeypatch):
    parsed = []
    real = coco_module._load_json
    monkeypatch.setattr(
        coco_module, "_load_json", lambda p, **kw: parsed.append(p.name) or real(p, **kw)
    )
    t = build_training(tiny_cfg("max_boxes=[3,6,32]", "eval=false"))
    # one parse per file, though the bucket sampler and val's ground truth read them too
    assert sorted(parsed) == ["instances_train2017.json", "instances_val2017.json"]
    train, val = t.data.train_set, t.data.val_set
    assert train._coco is None and val._coco is not None  # val keeps pycocotools for eval
    # nothing per annotation survives in the training set: arrays, paths, scalars, ids
    for name, value in vars(train).items():
        assert not isinstance(value, (dict, COCO)), name
        assert not isinstance(value, list) or name in ("ids", "category_ids"), name
    want = box_table(load_coco(train.ann_file), train.ids).counts
    assert np.array_equal(train.box_counts, want)  # the bucket sampler's counts


def test_boxes_only_parse_drops_segmentation_and_nothing_else(tmp_path):
    anns = [
        {"id": 1, "bbox": [1, 2, 3, 4], "segmentation": [[1.5, 2.0, 3.25, 4.0, 5.0, 6.0]]},
        {"id": 2, "bbox": [1, 2, 3, 4], "segmentation": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 1, 2, 3]]},
        {"id": 3, "bbox": [0, 0, 1, 1], "segmentation": {"counts": "]\\[1o`0]]", "size": [4, 4]}},
        {"id": 4, "bbox": [0, 0, 1, 1], "segmentation": {"size": [2, 2], "counts": [0, 3, 1]}},
        {"id": 5, "bbox": [9, 9, 1, 1], "segmentation": []},
    ]
    data = {"info": {"note": 'a "segmentation": [[ in a string'}, "images": [], "annotations": anns}
    data["categories"] = CATS
    want = json.loads(json.dumps(data))
    for a in want["annotations"]:
        a["segmentation"] = None
    path = tmp_path / "a.json"
    for separators in ((",", ":"), (", ", ": ")):  # compact and json.dumps' default
        path.write_text(json.dumps(data, separators=separators))
        assert coco_module._load_json(path, boxes_only=True) == want
        assert coco_module._load_json(path) == json.loads(json.dumps(data))
    path.write_text(json.dumps(data, indent=1))  # pretty-printed: not cut, parsed whole
    with pytest.raises(ValueError, match="unexpected form"):
        coco_module._without_segmentation(path.read_bytes())
    assert coco_module._load_json(path, boxes_only=True) == json.loads(json.dumps(data))
