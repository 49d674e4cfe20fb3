"""Box-count buckets (max_boxes=[...]): config, sampler, device-side shapes, loss, resume, compile."""

import json

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from ssd_npu.build import build_training
from ssd_npu.config import validate
from ssd_npu.data.buckets import BucketBatchSampler, bucket_of
from ssd_npu.device.compiler import reset
from ssd_npu.errors import ConfigError
from ssd_npu.loss.ssd import fixed_ssd_loss
from ssd_npu.models.detector import build_detector, canvas_anchors
from ssd_npu.train import run
from tests.helpers import compose_cfg, losses, torchvision_loss

# The tiny set's box counts are [5 3 1 4 4 0 3 5 4 40 1 2]: 6 images in bucket 3, 5 in 6, 1 in 32.
BUCKETS = "max_boxes=[3,6,32]"
FAST = ("canvas=[128,128]", BUCKETS, "eval=false")


def test_config_takes_an_int_or_sorted_buckets():
    assert compose_cfg("max_boxes=50").max_boxes == 50
    cfg = compose_cfg("max_boxes=[16,32,64]")
    validate(cfg)
    assert list(cfg.max_boxes) == [16, 32, 64]
    for bad in (
        "max_boxes=[32,16]",
        "max_boxes=[8,8]",
        "max_boxes=[0,8]",
        "max_boxes=[]",
        "max_boxes=abc",
        "max_boxes=[8,true]",
    ):
        with pytest.raises(ConfigError, match=r"^max_boxes=.* is not valid"):
            validate(compose_cfg(bad))
    with pytest.raises(ConfigError, match="compiler.fail_on_recompile"):
        validate(compose_cfg("max_boxes=[8,16]", "compiler.fail_on_recompile=true"))


def test_sampler_batches_are_full_single_bucket_and_seeded():
    counts = np.array([0, 1, 5, 9, 30, 2, 6, 7, 100, 3, 4, 8, 40, 41, 1])
    sizes = (4, 8, 64)
    bucket = bucket_of(counts, sizes)
    assert bucket.tolist() == [0, 0, 1, 2, 2, 0, 1, 1, 2, 0, 0, 1, 2, 2, 0]  # 100 -> largest
    s = BucketBatchSampler(counts, sizes, batch_size=2, seed=3)
    epoch0 = list(s)
    assert len(epoch0) == len(s) == 3 + 2 + 2  # 6, 4 and 5 images: drop_last per bucket
    for batch in epoch0:
        assert len(batch) == 2 and len({bucket[i] for i, _ in batch}) == 1
        assert all(epoch == 0 for _, epoch in batch)
    epoch1 = list(s)
    assert epoch1 != epoch0  # reshuffled per epoch
    again = BucketBatchSampler(counts, sizes, batch_size=2, seed=3)
    assert list(again) == epoch0  # a function of (seed, epoch) alone
    again.set_epoch(1)
    again.skip(3)  # resume after 3 batches: the rest of the same epoch
    assert list(again) == epoch1[3:]


def test_ranks_share_the_bucket_of_each_step():
    counts = np.array([1] * 9 + [20] * 7)
    ranks = [BucketBatchSampler(counts, (4, 32), 2, 0, num_replicas=2, rank=r) for r in (0, 1)]
    steps = list(zip(*ranks, strict=True))
    assert len(steps) == 2 + 1
    seen = [i for step in steps for batch in step for i, _ in batch]
    assert len(seen) == len(set(seen))  # disjoint across ranks
    for a, b in steps:
        assert len({counts[i] for i, _ in a + b}) == 1


def test_device_shapes_only_take_bucket_values(tiny_cfg):
    t = build_training(tiny_cfg(*FAST))
    assert t.data.train.batch_sampler is t.data.train_sampler  # what the loop resumes
    # one image in bucket 32: no full batch of it
    assert t.data.train_sampler.batches_per_bucket == {3: 3, 6: 2, 32: 0}
    seen = set()
    for _ in range(2):  # two epochs
        for batch in t.data.train:
            m = batch.boxes.shape[1]
            most = int(batch.valid.sum(1).max())
            assert m == min(b for b in (3, 6, 32) if b >= most)  # smallest bucket that holds it
            assert batch.images.shape == (2, 3, 128, 128)
            assert batch.labels.shape == batch.valid.shape == (2, m)
            assert not batch.labels[~batch.valid].any()  # the cut removed padding only
            seen.add(m)
    assert seen <= {3, 6, 32} and len(seen) >= 2
    for batch in t.data.val:
        assert batch.boxes.shape[1] in (3, 6, 32)


def test_loss_equals_torchvision_for_each_bucket(tiny_cfg):
    t = build_training(tiny_cfg("canvas=[320,320]", BUCKETS, "augment=false"))
    detector = build_detector(6, (320, 320))
    anchors = canvas_anchors(detector, (320, 320))
    g = torch.Generator().manual_seed(0)
    done = set()
    for batch in t.data.train:
        m = batch.boxes.shape[1]
        cls_logits = torch.randn(2, anchors.shape[0], 6, generator=g) * 3
        bbox_regression = torch.randn(2, anchors.shape[0], 4, generator=g)
        ours = fixed_ssd_loss(
            cls_logits,
            bbox_regression,
            anchors,
            batch.boxes,
            batch.labels,
            batch.valid,
            box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)),
        )
        targets = [
            {"boxes": b[v], "labels": lab[v]}
            for b, lab, v in zip(batch.boxes, batch.labels, batch.valid, strict=True)
        ]
        ref, _ = torchvision_loss(detector, anchors, cls_logits, bbox_regression, targets)
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6)
        done.add(m)
    assert done == {3, 6}  # no augmentation: the annotation buckets exactly


def test_summary_counts_batches_and_resume_keeps_the_bucket_order(tiny_cfg, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = run(tiny_cfg(*FAST, "max_steps=7", out=straight))
    buckets = json.loads((straight / "summary.json").read_text())["buckets"]
    assert buckets == summary["buckets"] and buckets["sizes"] == [3, 6, 32]
    assert sum(buckets["batches"].values()) == 7 and buckets["graphs"] is None
    assert summary["max_boxes"] == [3, 6, 32]
    run(tiny_cfg(*FAST, "max_steps=3", out=split))
    run(tiny_cfg(*FAST, "max_steps=7", "resume=auto", out=split))
    expected, got = losses(straight), losses(split)
    # steps 4-7 cross the epoch boundary (5 batches per epoch): same batches, same losses
    for step in range(4, 8):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_compiled_graphs_never_exceed_the_buckets(tiny_cfg):
    reset()
    cfg = tiny_cfg(
        "canvas=[128,128]",
        "max_boxes=[3,32]",  # 2 + 3 batches: both shapes within 5 steps
        "eval=false",
        "compile=true",
        "max_steps=5",
    )
    summary = run(cfg)
    buckets = summary["buckets"]
    used = [m for m, n in buckets["batches"].items() if n]
    assert len(used) == 2  # both shapes really ran
    assert summary["graphs_compiled"] <= 2
    assert sum(buckets["graphs"].values()) == summary["graphs_compiled"]
    assert all(buckets["graphs"][m] <= 1 for m in used)
