"""fixed_ssd_loss against torchvision's own SSD.compute_loss and SSDMatcher."""

import pytest
import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from ssd_npu.loss.common import PADDING_IOU, padded_iou
from ssd_npu.loss.ssd import fixed_ssd_loss, match_anchors
from ssd_npu.models.detector import canvas_anchors
from ssd_npu.tools.op_recorder import OpRecorder
from tests.helpers import op_calls, recorded_step, torchvision_loss

NUM_CLASSES = 4
CANVAS = (320, 320)


@pytest.fixture(scope="module")
def reference():
    """A tiny torchvision SSDLite whose compute_loss/matcher are the reference."""
    model = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    )
    return model, canvas_anchors(model, CANVAS)


def random_boxes(generator, n, canvas=CANVAS):
    h, w = canvas
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.9, h * 0.9])
    wh = 2 + torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.6, h * 0.6])
    box = torch.cat([xy, xy + wh], 1)
    return box.clamp(max=torch.tensor([w, h, w, h], dtype=torch.float32))


def pad(boxes_list, labels_list, max_boxes, generator, garbage=True):
    """Scatter each image's boxes into random rows of M; fill the others with garbage."""
    batch = len(boxes_list)
    boxes = torch.full((batch, max_boxes, 4), float("nan"))
    if garbage:
        boxes = torch.randn(batch, max_boxes, 4, generator=generator) * 1e4
        boxes[0, -1] = float("nan")
        boxes[-1, 0] = float("inf")
    labels = torch.randint(-5, 99, (batch, max_boxes), generator=generator)
    valid = torch.zeros(batch, max_boxes, dtype=torch.bool)
    for i, (b, lab) in enumerate(zip(boxes_list, labels_list, strict=True)):
        rows = torch.randperm(max_boxes, generator=generator)[: len(b)].sort().values
        boxes[i, rows] = b
        labels[i, rows] = lab
        valid[i, rows] = True
    return boxes, labels, valid


def compare(reference, boxes_list, labels_list, max_boxes, seed, garbage=True):
    model, anchors = reference
    g = torch.Generator().manual_seed(seed)
    batch = len(boxes_list)
    cls_logits = torch.randn(batch, anchors.shape[0], NUM_CLASSES, generator=g) * 3
    bbox_regression = torch.randn(batch, anchors.shape[0], 4, generator=g)
    boxes, labels, valid = pad(boxes_list, labels_list, max_boxes, g, garbage)

    ref_in = [t.clone().requires_grad_() for t in (cls_logits, bbox_regression)]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes_list, labels_list, strict=True)]
    ref, ref_matched = torchvision_loss(model, anchors, *ref_in, targets)
    sum(ref.values()).backward()

    ours_in = [t.clone().requires_grad_() for t in (cls_logits, bbox_regression)]
    ours = fixed_ssd_loss(
        *ours_in, anchors, boxes, labels, valid, box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0))
    )
    sum(ours.values()).backward()

    assert set(ours) == {"bbox_regression", "classification"}
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours_in, ref_in, strict=True):
        assert torch.isfinite(mine.grad).all()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)

    # The matching itself, mapped from padded rows back to torchvision's compact indices.
    matched = match_anchors(anchors, torch.nan_to_num(boxes), valid)
    for i, ref_m in enumerate(ref_matched):
        compact = torch.full((max_boxes,), -1, dtype=torch.int64)
        compact[valid[i]] = torch.arange(int(valid[i].sum()))
        mapped = torch.where(matched[i] >= 0, compact[matched[i].clamp(min=0)], -1)
        assert torch.equal(mapped, ref_m.clamp(min=-1))
    return ours


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_match_torchvision(reference, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    batch, max_boxes = 3, 12
    counts = torch.randint(0, max_boxes + 1, (batch,), generator=g).tolist()
    boxes = [random_boxes(g, n) for n in counts]
    labels = [torch.randint(1, NUM_CLASSES, (n,), generator=g) for n in counts]
    compare(reference, boxes, labels, max_boxes, seed)


def test_no_boxes_anywhere(reference):
    empty = torch.zeros(0, 4)
    out = compare(reference, [empty, empty], [torch.zeros(0, dtype=torch.int64)] * 2, 5, 1)
    assert out["bbox_regression"] == 0


def test_one_box_and_empty_image(reference):
    box = torch.tensor([[10.0, 20.0, 100.0, 150.0]])
    compare(
        reference,
        [box, torch.zeros(0, 4)],
        [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)],
        4,
        2,
    )


def test_duplicate_boxes_share_best_anchor(reference):
    box = torch.tensor([[40.0, 40.0, 120.0, 90.0]] * 3 + [[41.0, 40.0, 120.0, 90.0]])
    compare(reference, [box], [torch.tensor([1, 2, 3, 1])], 6, 3)


def test_box_covering_the_canvas(reference):
    box = torch.tensor([[0.0, 0.0, 320.0, 320.0], [5.0, 5.0, 30.0, 30.0]])
    compare(reference, [box], [torch.tensor([3, 1])], 3, 4)


def test_all_rows_valid(reference):
    g = torch.Generator().manual_seed(5)
    boxes = [random_boxes(g, 7) for _ in range(2)]
    labels = [torch.randint(1, NUM_CLASSES, (7,), generator=g) for _ in range(2)]
    compare(reference, boxes, labels, 7, 5, garbage=False)


def test_many_boxes_make_negatives_overlap_positives(reference):
    """4 x positives > anchors per image: torchvision counts some anchors twice; so must we."""
    model, anchors = reference
    g = torch.Generator().manual_seed(6)
    picks = torch.randperm(anchors.shape[0], generator=g)[:900]
    boxes = anchors[picks].clamp(0, 320)
    keep = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
    boxes = boxes[keep]
    labels = torch.randint(1, NUM_CLASSES, (len(boxes),), generator=g)
    compare(reference, [boxes], [labels], len(boxes) + 3, 6)


def test_loss_ops_have_no_data_dependent_shapes(reference):
    """Every intermediate shape depends only on B, A, C, M, whatever the boxes are."""
    _, anchors = reference
    recorder = OpRecorder()
    for seed, counts in enumerate([(0, 3), (5, 1), (6, 6)]):
        g = torch.Generator().manual_seed(seed)
        boxes, labels, valid = pad(
            [random_boxes(g, n) for n in counts],
            [torch.randint(1, NUM_CLASSES, (n,), generator=g) for n in counts],
            6,
            g,
        )
        logits = torch.randn(2, anchors.shape[0], NUM_CLASSES, requires_grad=True)
        deltas = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
        with recorded_step(recorder):
            out = fixed_ssd_loss(
                logits, deltas, anchors, boxes, labels, valid, box_coder=BoxCoder((10, 10, 5, 5))
            )
            sum(out.values()).backward()
    first = recorder.steps[0]
    assert op_calls(first) > 50 and {kind for kind, _, _ in first} == {"fwd", "bwd"}
    assert recorder.steps[1] == first and recorder.steps[2] == first
    assert recorder.syncs == {}  # no .item(), nonzero or boolean-mask indexing


def test_box_coder_is_keyword_only_and_defaults_to_torchvisions(reference):
    model, anchors = reference
    g = torch.Generator().manual_seed(7)
    boxes, labels, valid = pad([random_boxes(g, 3)], [torch.tensor([1, 2, 3])], 5, g)
    logits = torch.randn(1, anchors.shape[0], NUM_CLASSES, generator=g)
    deltas = torch.randn(1, anchors.shape[0], 4, generator=g)
    default = fixed_ssd_loss(logits, deltas, anchors, boxes, labels, valid)
    theirs = fixed_ssd_loss(
        logits, deltas, anchors, boxes, labels, valid, box_coder=model.box_coder
    )  # torchvision's SSD coder, (10, 10, 5, 5)
    for key in theirs:
        torch.testing.assert_close(default[key], theirs[key], rtol=0, atol=0)
    with pytest.raises(TypeError):
        fixed_ssd_loss(logits, deltas, anchors, boxes, labels, valid, model.box_coder)


def test_padded_iou_is_torchvisions_box_iou_bit_for_bit(reference):
    """The per-coordinate IoU does box_iou's float operations: equal bits, not just close."""
    _, anchors = reference
    g = torch.Generator().manual_seed(7)
    counts = [0, 5, 12]
    boxes, _, valid = pad(
        [random_boxes(g, n) for n in counts], [torch.ones(n, dtype=torch.int64) for n in counts],
        12, g,
    )  # fmt: skip
    iou = padded_iou(anchors, boxes, valid)
    assert iou.shape == (3, 12, anchors.shape[0])
    for i in range(3):
        assert torch.equal(iou[i, valid[i]], box_iou(boxes[i, valid[i]], anchors))
        assert (iou[i, ~valid[i]] == PADDING_IOU).all()  # NaN/inf padding never leaks
