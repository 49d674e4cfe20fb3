"""fixed_retinanet_loss against torchvision's own RetinaNet.compute_loss and Matcher."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead, _default_anchorgen
from torchvision.ops import box_iou

from ssd_npu.loss.retinanet import (
    BOX_LOSS_TYPES,
    RetinaNetLossOptions,
    fixed_retinanet_loss,
    match_anchors_retinanet,
    retinanet_loss_sums,
    retinanet_normalise,
)
from ssd_npu.tools.op_recorder import OpRecorder
from tests.helpers import (
    assert_bitwise_equal,
    assert_close_to_reference,
    compact_matches,
    op_calls,
    recorded_step,
)

NUM_CLASSES = 4
CANVAS = (192, 192)
Targets = list[dict[str, Tensor]]


@pytest.fixture(scope="module")
def anchors() -> Tensor:
    """torchvision's RetinaNet anchors (5 levels x 9) for the canvas: [6921, 4] xyxy px."""
    h, w = CANVAS
    images = ImageList(torch.zeros(1, 3, h, w), [CANVAS])
    features = [torch.zeros(1, 1, -(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    return _default_anchorgen()(images, features)[0]


def torchvision_loss(
    anchors: Tensor, cls_logits: Tensor, bbox_regression: Tensor, targets: Targets, loss_type: str
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """torchvision's own `RetinaNet.compute_loss` (matcher, empty-image branch and head)."""
    head = RetinaNetHead(in_channels=8, num_anchors=9, num_classes=NUM_CLASSES)
    head.regression_head._loss_type = loss_type
    retinanet = SimpleNamespace(proposal_matcher=Matcher(0.5, 0.4, True), head=head)
    outputs = {"cls_logits": cls_logits, "bbox_regression": bbox_regression}
    loss = RetinaNet.compute_loss(retinanet, targets, outputs, [anchors] * len(targets))
    matched = [
        retinanet.proposal_matcher(box_iou(t["boxes"], anchors))
        if t["boxes"].numel()
        else torch.full((anchors.shape[0],), -1)
        for t in targets
    ]
    return loss, matched


def random_boxes(g: torch.Generator, n: int) -> Tensor:
    h, w = CANVAS
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.9, h * 0.9])
    wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    return torch.cat([xy, xy + wh], 1).clamp(max=torch.tensor([w, h, w, h]).float())


def pad(
    boxes_list: list[Tensor], labels_list: list[Tensor], max_boxes: int, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each image's boxes in random rows of M: (garbage-padded boxes, clean-padded boxes,
    labels, valid). Garbage: huge values, NaN, +-inf; labels out of range."""
    batch, dtype = len(boxes_list), boxes_list[0].dtype
    garbage = (torch.randn(batch, max_boxes, 4, generator=g) * 1e30).to(dtype)
    garbage[0, -1] = float("nan")
    garbage[-1, 0] = float("inf")
    garbage[-1, -1, :2] = -float("inf")
    clean = torch.zeros(batch, max_boxes, 4, dtype=dtype)
    labels = torch.randint(-5, 99, (batch, max_boxes), generator=g)
    valid = torch.zeros(batch, max_boxes, dtype=torch.bool)
    for i, (b, lab) in enumerate(zip(boxes_list, labels_list, strict=True)):
        rows = torch.randperm(max_boxes, generator=g)[: len(b)].sort().values
        garbage[i, rows], clean[i, rows] = b, b
        labels[i, rows] = lab
        valid[i, rows] = True
    return garbage, clean, labels, valid


def ours_with_grads(
    inputs: tuple[Tensor, Tensor], anchors: Tensor, boxes: Tensor, labels: Tensor,
    valid: Tensor, loss_type: str,
) -> tuple[dict[str, Tensor], list[Tensor]]:  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fixed_retinanet_loss(*leaves, anchors, boxes, labels, valid, bbox_reg_loss_type=loss_type)
    sum(out.values()).backward()
    return out, [t.grad for t in leaves]


def compare(
    anchors: Tensor, boxes_list: list[Tensor], labels_list: list[Tensor], max_boxes: int,
    seed: int, loss_type: str = "l1", dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], Tensor]:  # fmt: skip
    """Values, gradients and matching against torchvision; garbage padding changes nothing."""
    g = torch.Generator().manual_seed(seed)
    anchors = anchors.to(dtype)
    boxes_list = [b.to(dtype) for b in boxes_list]
    batch, num_anchors = len(boxes_list), anchors.shape[0]
    cls_logits = (torch.randn(batch, num_anchors, NUM_CLASSES, generator=g) * 3 - 2).to(dtype)
    bbox_regression = torch.randn(batch, num_anchors, 4, generator=g).to(dtype)
    garbage, clean, labels, valid = pad(boxes_list, labels_list, max_boxes, g)

    ref_in = [t.clone().requires_grad_() for t in (cls_logits, bbox_regression)]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes_list, labels_list, strict=True)]
    ref, ref_matched = torchvision_loss(anchors, *ref_in, targets, loss_type)
    sum(ref.values()).backward()
    ours, grads = ours_with_grads(
        (cls_logits, bbox_regression), anchors, garbage, labels, valid, loss_type
    )

    assert list(ours) == ["classification", "bbox_regression"]  # torchvision's order
    assert_close_to_reference(ours, grads, ref, ref_in)

    # Padding rows: garbage or zeros, the results are bit for bit the same.
    clean_run = ours_with_grads(
        (cls_logits, bbox_regression), anchors, clean, labels, valid, loss_type
    )
    assert_bitwise_equal((ours, grads), clean_run)

    # The matching itself, mapped from padded rows back to torchvision's compact indices.
    matched = match_anchors_retinanet(anchors, garbage, valid)
    assert torch.equal(compact_matches(matched, valid), torch.stack(ref_matched))
    return ours, torch.stack(ref_matched)


def random_batch(
    seed: int, batch: int, max_boxes: int, make_boxes: Callable[..., Tensor] = random_boxes
) -> tuple[list[Tensor], list[Tensor]]:
    """Up to max_boxes boxes (`make_boxes(generator, n)`) and labels per image."""
    g = torch.Generator().manual_seed(1000 + seed)
    counts = torch.randint(0, max_boxes + 1, (batch,), generator=g).tolist()
    boxes = [make_boxes(g, n) for n in counts]
    labels = [torch.randint(0, NUM_CLASSES, (n,), generator=g) for n in counts]
    return boxes, labels


@pytest.mark.parametrize("seed", range(10))
def test_random_batches_match_torchvision(anchors, seed):
    boxes, labels = random_batch(seed, batch=3, max_boxes=10)
    _, matched = compare(anchors, boxes, labels, 10, seed)
    assert (matched == -2).any() and (matched == -1).any() and (matched >= 0).any()


@pytest.mark.parametrize("loss_type", BOX_LOSS_TYPES)
@pytest.mark.parametrize("seed", range(2))
def test_every_box_loss_type_matches_torchvision(anchors, loss_type, seed):
    boxes, labels = random_batch(20 + seed, batch=3, max_boxes=8)
    boxes[0] = torch.cat([boxes[0], random_boxes(torch.Generator().manual_seed(seed), 1)])
    labels[0] = torch.cat([labels[0], torch.tensor([1])])
    compare(anchors, boxes, labels, 9, seed, loss_type)


@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_float64_equal_to_rounding(anchors, loss_type):
    boxes, labels = random_batch(3, batch=2, max_boxes=6)
    compare(anchors, boxes, labels, 6, 3, loss_type, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_no_boxes_anywhere(anchors, loss_type):
    """All anchors background: focal loss over everything / 1; no box loss."""
    empty, no_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    out, matched = compare(anchors, [empty, empty], [no_labels] * 2, 5, 1, loss_type)
    assert out["bbox_regression"] == 0 and out["classification"] > 0
    assert (matched == -1).all()


@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_one_box_and_empty_image(anchors, loss_type):
    box = torch.tensor([[10.0, 20.0, 100.0, 150.0]])
    empty = torch.zeros(0, 4)
    compare(anchors, [box, empty], [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)], 4, 2, loss_type)  # fmt: skip


def test_duplicate_boxes_tie_to_the_first(anchors):
    """Equal IoU with several boxes: torch.max's first index wins, in padded rows as in compact."""
    box = torch.tensor([[40.0, 40.0, 120.0, 90.0]] * 3 + [[41.0, 40.0, 120.0, 90.0]])
    compare(anchors, [box], [torch.tensor([1, 2, 3, 0])], 6, 3)


def test_all_rows_valid_and_box_covering_the_canvas(anchors):
    g = torch.Generator().manual_seed(5)
    boxes = [random_boxes(g, 6), torch.tensor([[0.0, 0.0, 192.0, 192.0]] + [[5.0, 5, 30, 30]] * 5)]
    labels = [torch.randint(0, NUM_CLASSES, (6,), generator=g) for _ in range(2)]
    compare(anchors, boxes, labels, 6, 5)


def test_ignored_anchors_between_thresholds(anchors):
    """A box whose best IoU is in [0.4, 0.5): its best anchors are kept (low-quality match),
    the other anchors in [0.4, 0.5) are ignored (-2) and left out of the focal loss."""
    box = torch.tensor([[60.0, 60.0, 72.0, 124.0]])  # best IoU 0.45, with two anchors
    iou = box_iou(box, anchors)[0]
    assert 0.4 <= iou.max() < 0.5
    _, matched = compare(anchors, [box], [torch.tensor([3])], 3, 7)
    best = iou == iou.max()
    assert (matched[0][best] == 0).all()
    assert (matched[0][(iou >= 0.4) & ~best] == -2).any()


def test_low_quality_match_restores_the_anchors_own_best_box(anchors):
    """A 4x4 box (best IoU 0.016) still gets its best anchors, several tied; a tied anchor
    whose own best box is another one gets *that* box: set_low_quality_matches_ restores
    `all_matches`, not the box whose tie it was."""
    tiny = [2.0, 2.0, 6.0, 6.0]
    other = [-23.0, -11.0, -5.0, 11.0]  # IoU 0.39 (< 0.4) with anchor [-23, -11, 23, 11]
    boxes = torch.tensor([tiny, other])
    iou = box_iou(boxes, anchors)
    tied = iou[0] == iou[0].max()
    assert iou[0].max() < 0.4 and tied.sum() > 1
    _, matched = compare(anchors, [boxes], [torch.tensor([1, 2])], 4, 8)
    assert (matched[0][tied] >= 0).all()
    assert (matched[0][tied] == 0).any() and (matched[0][tied] == 1).any()


def test_garbage_padding_everywhere_gives_finite_gradients(anchors):
    """Every padding row NaN / inf / 1e38, labels out of range: nothing leaks."""
    box = torch.tensor([[30.0, 30.0, 90.0, 120.0]])
    valid = torch.tensor([[False, True, False, False], [False] * 4])
    for fill in (float("nan"), float("inf"), -float("inf"), 1e38):
        boxes = torch.full((2, 4, 4), fill)
        boxes[0, 1] = box
        labels = torch.full((2, 4), 10**6)
        labels[0, 1] = 1
        for loss_type in BOX_LOSS_TYPES:
            logits = torch.randn(2, anchors.shape[0], NUM_CLASSES, requires_grad=True)
            deltas = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
            out = fixed_retinanet_loss(
                logits, deltas, anchors, boxes, labels, valid, bbox_reg_loss_type=loss_type
            )
            sum(out.values()).backward()
            assert all(torch.isfinite(v) for v in out.values())
            assert torch.isfinite(logits.grad).all() and torch.isfinite(deltas.grad).all()


def test_data_parallel_split_sums_to_the_global_loss(anchors):
    """Two "ranks" of 2 images, each normalised by the global 4 images: the shares add up to
    the loss of the whole batch (per-image foreground counts need no all-reduce)."""
    boxes, labels = random_batch(9, batch=4, max_boxes=5)
    g = torch.Generator().manual_seed(9)
    garbage, _, labels_t, valid = pad(boxes, labels, 5, g)
    logits = torch.randn(4, anchors.shape[0], NUM_CLASSES, generator=g)
    deltas = torch.randn(4, anchors.shape[0], 4, generator=g)
    whole = fixed_retinanet_loss(logits, deltas, anchors, garbage, labels_t, valid)
    shares = [
        retinanet_normalise(
            *retinanet_loss_sums(logits[r], deltas[r], anchors, garbage[r], labels_t[r], valid[r]),
            num_images=4,
        )
        for r in (slice(0, 2), slice(2, 4))
    ]
    for key in whole:
        torch.testing.assert_close(shares[0][key] + shares[1][key], whole[key])


def test_unknown_box_loss_type_is_refused(anchors):
    with pytest.raises(ValueError, match="bbox_reg_loss_type"):
        fixed_retinanet_loss(
            torch.zeros(1, anchors.shape[0], NUM_CLASSES), torch.zeros(1, anchors.shape[0], 4),
            anchors, torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.int64),
            torch.zeros(1, 1, dtype=torch.bool), bbox_reg_loss_type="iou",
        )  # fmt: skip
    # the options object refuses it when built, before any loss is computed
    with pytest.raises(ValueError, match="bbox_reg_loss_type 'iou'"):
        RetinaNetLossOptions(bbox_reg_loss_type="iou")


def test_sums_take_the_options_object(anchors):
    """`retinanet_loss_sums(..., options)` is `fixed_retinanet_loss` with those keywords."""
    boxes, labels = random_batch(4, batch=2, max_boxes=5)
    g = torch.Generator().manual_seed(4)
    garbage, _, labels_t, valid = pad(boxes, labels, 5, g)
    logits = torch.randn(2, anchors.shape[0], NUM_CLASSES, generator=g)
    deltas = torch.randn(2, anchors.shape[0], 4, generator=g)
    tensors = (logits, deltas, anchors, garbage, labels_t, valid)
    keywords = {"bbox_reg_loss_type": "giou", "bg_iou_thresh": 0.3, "focal_gamma": 1.5}
    whole = fixed_retinanet_loss(*tensors, **keywords)
    from_options = retinanet_normalise(
        *retinanet_loss_sums(*tensors, RetinaNetLossOptions(**keywords))
    )
    default = retinanet_normalise(*retinanet_loss_sums(*tensors))
    for key in whole:
        torch.testing.assert_close(from_options[key], whole[key], rtol=0, atol=0)
        assert not torch.equal(default[key], whole[key])  # the options were not ignored


@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_loss_ops_have_no_data_dependent_shapes(anchors, loss_type):
    """Forward and backward: no sync op, and the same ops with the same shapes whatever the
    number of valid boxes (0 included)."""
    recorder = OpRecorder()
    for seed, counts in enumerate([(0, 3), (5, 1), (6, 6)]):
        g = torch.Generator().manual_seed(seed)
        boxes, _, labels, valid = pad(
            [random_boxes(g, n) for n in counts],
            [torch.randint(0, NUM_CLASSES, (n,), generator=g) for n in counts],
            6,
            g,
        )
        logits = torch.randn(2, anchors.shape[0], NUM_CLASSES, requires_grad=True)
        deltas = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
        with recorded_step(recorder):
            out = fixed_retinanet_loss(
                logits, deltas, anchors, boxes, labels, valid, bbox_reg_loss_type=loss_type
            )
            sum(out.values()).backward()
    first = recorder.steps[0]
    assert op_calls(first) > 50 and {kind for kind, _, _ in first} == {"fwd", "bwd"}
    assert recorder.steps[1] == first and recorder.steps[2] == first
    assert recorder.syncs == {}  # no .item(), nonzero, unique or boolean-mask indexing
