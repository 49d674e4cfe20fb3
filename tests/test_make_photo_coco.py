"""scripts/make_photo_coco.py: the photo set written in parallel is the one written by one
process, byte for byte; ensure_photo_coco keeps a complete set and rewrites an incomplete or
different one."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location(
    "make_photo_coco", REPO / "scripts" / "make_photo_coco.py"
)
photos = importlib.util.module_from_spec(_spec)
sys.modules["make_photo_coco"] = photos
_spec.loader.exec_module(photos)


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parallel_equals_sequential(tmp_path):
    one = photos.make_photo_coco(tmp_path / "one", num_train=3, num_val=1, seed=5)
    two = photos.make_photo_coco(tmp_path / "two", num_train=3, num_val=1, seed=5, processes=2)
    assert files(one) == files(two)
    train = json.loads((one / "annotations" / "instances_train2017.json").read_text())
    assert [im["id"] for im in train["images"]] == [1, 2, 3]
    assert [a["id"] for a in train["annotations"]] == list(range(1, len(train["annotations"]) + 1))


def test_ensure_keeps_a_complete_set_and_rewrites_others(tmp_path):
    root = tmp_path / "photos"
    _, written = photos.ensure_photo_coco(root, 2, num_val=1, processes=1)
    assert written and json.loads((root / photos.MANIFEST).read_text())["num_train"] == 2
    first = files(root)
    _, written = photos.ensure_photo_coco(root, 2, num_val=1, processes=1)
    assert not written and files(root) == first  # kept between runs

    # an interrupted write leaves no manifest (it is written last): written anew, in full
    (root / photos.MANIFEST).unlink()
    (root / "train2017" / "000000000002.jpg").unlink()
    _, written = photos.ensure_photo_coco(root, 2, num_val=1, processes=1)
    assert written and files(root) == first

    # other counts: replaced, no file of the old set left behind
    _, written = photos.ensure_photo_coco(root, 1, num_val=1, processes=1)
    assert written and not (root / "train2017" / "000000000002.jpg").exists()
