"""A forked reader of the training set stays small: flat arrays, not a pycocotools index."""

from __future__ import annotations

from pathlib import Path

from ssd_npu.data.coco import CocoDetectionDataset
from ssd_npu.tools.memory import CocoIndexTargets, fork_readers, read_flat, write_coco_like

# ~45,000 boxes with polygons. Measured (2 readers, 10,000 images, 48-number polygons): 98 MB each
# for the pycocotools index, 3.5 MB for the flat arrays.
IMAGES = 6000
BOUND_MB = 20.0


def _set(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    write_coco_like(root / "annotations" / "instances_train.json", IMAGES, ["a.jpg"], seed=1)
    return root


def test_forked_reader_private_memory_stays_small(tmp_path):
    root = _set(tmp_path / "coco_like")
    ds = CocoDetectionDataset(root, "train")
    assert len(ds) == IMAGES
    flat = fork_readers(lambda i: read_flat(ds, i), len(ds), workers=2)
    assert all(mb < BOUND_MB for mb in flat), flat
    # the previous reader, on the same file: the bound is below what it copies
    ref = CocoIndexTargets(ds.ann_file, ds.img_dir)
    legacy = fork_readers(ref.read, len(ref.ids), workers=1, freeze=False)
    assert legacy[0] > 2 * BOUND_MB, legacy
