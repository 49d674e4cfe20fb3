"""fixed_fcos_loss against torchvision's own FCOS.compute_loss (matching and FCOSHead)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList

from ssd_npu.loss.common import clean_padding
from ssd_npu.loss.fcos import (
    FCOSLossOptions,
    fcos_loss_sums,
    fcos_normalise,
    fixed_fcos_loss,
    match_locations,
)
from ssd_npu.tools.op_recorder import OpRecorder
from tests.helpers import (
    assert_bitwise_equal,
    assert_close_to_reference,
    assert_same_ops_every_step,
    compact_matches,
    recorded_step,
)
from tests.test_retinanet_loss import pad
from tests.test_retinanet_loss import random_batch as retinanet_batch

NUM_CLASSES = 4
CANVAS = (320, 256)  # 40x32 + 20x16 + 10x8 + 5x4 + 3x2 = 1706 locations
STRIDES = (8, 16, 32, 64, 128)
Targets = list[dict[str, Tensor]]


@pytest.fixture(scope="module")
def levels() -> tuple[Tensor, list[int]]:
    """torchvision's FCOS anchors for the canvas (one per location, size = stride) and the
    locations per level: ([1706, 4] xyxy px, [1280, 320, 80, 20, 6])."""
    h, w = CANVAS
    images = ImageList(torch.zeros(1, 3, h, w), [CANVAS])
    features = [torch.zeros(1, 1, -(-h // s), -(-w // s)) for s in STRIDES]
    generator = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    per_level = [f.shape[-2] * f.shape[-1] for f in features]
    return generator(images, features)[0], per_level


def torchvision_loss(
    anchors: Tensor, per_level: list[int], head_outputs: tuple[Tensor, ...], targets: Targets
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """torchvision's own `FCOS.compute_loss` (its matching, then `FCOSHead.compute_loss`) and
    the matched indices it hands the head."""
    head = FCOSHead(in_channels=32, num_anchors=1, num_classes=NUM_CLASSES)
    seen: list[Tensor] = []

    def compute_loss(targets, outputs, anchors, matched_idxs):
        seen.extend(matched_idxs)
        return head.compute_loss(targets, outputs, anchors, matched_idxs)

    fcos = SimpleNamespace(
        center_sampling_radius=1.5, head=SimpleNamespace(compute_loss=compute_loss)
    )
    names = ("cls_logits", "bbox_regression", "bbox_ctrness")
    outputs = dict(zip(names, head_outputs, strict=True))
    loss = FCOS.compute_loss(fcos, targets, outputs, [anchors] * len(targets), per_level)
    return loss, seen


def ours_with_grads(
    inputs: tuple[Tensor, ...], anchors: Tensor, per_level: list[int], boxes: Tensor,
    labels: Tensor, valid: Tensor,
) -> tuple[dict[str, Tensor], list[Tensor]]:  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fixed_fcos_loss(*leaves, anchors, per_level, boxes, labels, valid)
    sum(out.values()).backward()
    return out, [t.grad for t in leaves]


def compare(
    levels: tuple[Tensor, list[int]], boxes_list: list[Tensor], labels_list: list[Tensor],
    max_boxes: int, seed: int, dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], Tensor]:  # fmt: skip
    """Values, gradients and matching against torchvision; garbage padding changes nothing."""
    anchors, per_level = levels
    g = torch.Generator().manual_seed(seed)
    anchors = anchors.to(dtype)
    boxes_list = [b.to(dtype) for b in boxes_list]
    batch, num_anchors = len(boxes_list), anchors.shape[0]
    head = tuple(t.to(dtype) for t in random_head(g, batch, num_anchors, spread=3.0))
    garbage, clean, labels, valid = pad(boxes_list, labels_list, max_boxes, g)

    ref_in = [t.clone().requires_grad_() for t in head]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes_list, labels_list, strict=True)]
    ref, ref_matched = torchvision_loss(anchors, per_level, tuple(ref_in), targets)
    sum(ref.values()).backward()
    ours, grads = ours_with_grads(head, anchors, per_level, garbage, labels, valid)

    assert list(ours) == list(ref)  # torchvision's keys, in its order
    assert_close_to_reference(ours, grads, ref, ref_in)

    # Padding rows: garbage or zeros, the results are bit for bit the same.
    clean_run = ours_with_grads(head, anchors, per_level, clean, labels, valid)
    assert_bitwise_equal((ours, grads), clean_run)

    # The matching itself, mapped from padded rows back to torchvision's compact indices.
    matched = match_locations(anchors, per_level, clean_padding(garbage, labels, valid)[0], valid)
    assert torch.equal(compact_matches(matched, valid), torch.stack(ref_matched))
    return ours, torch.stack(ref_matched)


def random_head(
    g: torch.Generator, batch: int, num_anchors: int, spread: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random head outputs: cls_logits [B, A, C] ~ N(1 - spread, spread^2), bbox_regression
    [B, A, 4] uniform in [0, spread) (>= 0, as after the head's ReLU), bbox_ctrness [B, A, 1]."""
    return (
        torch.randn(batch, num_anchors, NUM_CLASSES, generator=g) * spread + 1 - spread,
        torch.rand(batch, num_anchors, 4, generator=g) * spread,
        torch.randn(batch, num_anchors, 1, generator=g),
    )


def padded_case(
    levels: tuple[Tensor, list[int]], seed: int, batch: int
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, list[int], Tensor, Tensor, Tensor]]:
    """A random batch of up to 5 boxes per image: (head, the loss's other arguments)."""
    anchors, per_level = levels
    boxes, labels = random_batch(seed, batch=batch, max_boxes=5)
    g = torch.Generator().manual_seed(seed)
    garbage, _, labels_t, valid = pad(boxes, labels, 5, g)
    return random_head(g, batch, anchors.shape[0]), (anchors, per_level, garbage, labels_t, valid)


def random_boxes(g: torch.Generator, n: int) -> Tensor:
    """Boxes of every scale (squared uniform sides: many small, some canvas-wide)."""
    h, w = CANVAS
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 3 + torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w, h])
    return torch.cat([xy, xy + wh], 1).clamp(max=torch.tensor([w, h, w, h]).float())


def random_batch(seed: int, batch: int, max_boxes: int) -> tuple[list[Tensor], list[Tensor]]:
    """The RetinaNet tests' random batch, with boxes of every scale on this canvas."""
    return retinanet_batch(1000 + seed, batch, max_boxes, random_boxes)


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_match_torchvision(levels, seed):
    boxes, labels = random_batch(seed, batch=3, max_boxes=12)
    _, matched = compare(levels, boxes, labels, 12, seed)
    assert (matched == -1).any() and (matched >= 0).any()


def test_crowded_boxes_cover_every_level(levels):
    """Many boxes on top of each other, small to larger than the canvas: locations with
    several candidate boxes on each of the five levels, the last one's range open to inf."""
    g = torch.Generator().manual_seed(7)
    crowd = torch.tensor([[60.0, 60.0, 200.0, 260.0]]) + torch.randn(12, 4, generator=g) * 20
    # largest side distances < 64 (level 0), 256..512 (level 3), > 512 (level 4, to inf)
    small = torch.tensor([[100.0, 100.0, 140.0, 150.0], [110.0, 90.0, 150.0, 130.0]])
    large = torch.tensor([[-200.0, -150.0, 450.0, 500.0]])
    huge = torch.tensor([[-500.0, -500.0, 760.0, 820.0]])
    boxes = [torch.cat([crowd, small, large, huge]), random_boxes(g, 10)]
    labels = [torch.randint(0, NUM_CLASSES, (len(b),), generator=g) for b in boxes]
    _, matched = compare(levels, boxes, labels, 16, 7)
    level_of = torch.repeat_interleave(torch.arange(5), torch.tensor(levels[1]))
    assert set(level_of[(matched[0] >= 0)].tolist()) == {0, 1, 2, 3, 4}
    assert (matched[0][level_of == 4] == 15).any() and (matched[0][level_of == 3] == 14).any()


def test_smallest_box_wins_and_ties_go_to_the_first(levels):
    """Nested boxes: the smaller takes the shared locations. Duplicates: the first row. Areas
    1003 and 1000 px^2: `1e8 - area` rounds to the same float32, so torchvision's max ties and
    the *first* (larger) box wins; in float64 the smaller one does: both reproduced."""
    big, small = [40.0, 40.0, 200.0, 200.0], [90.0, 90.0, 130.0, 130.0]
    dup = [10.0, 150.0, 60.0, 230.0]
    near_a = [150.0, 20.0, 150.0 + 1003 / 40, 60.0]  # 25.075 x 40 = 1003 px^2
    near_b = [150.0, 20.0, 175.0, 60.0]  # 25 x 40 = 1000 px^2
    boxes = torch.tensor([big, small, dup, dup, near_a, near_b])
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    _, matched = compare(levels, [boxes], [labels], 8, 3)
    assert (matched[0] == 1).any() and not (matched[0] == 3).any() and (matched[0] == 2).any()
    assert (matched[0] == 4).any() and not (matched[0] == 5).any()  # the float32 tie
    _, matched64 = compare(levels, [boxes], [labels], 8, 3, dtype=torch.float64)
    assert (matched64[0] == 5).any() and not (matched64[0] == 4).any()


def test_float64_equal_to_rounding(levels):
    boxes, labels = random_batch(3, batch=2, max_boxes=8)
    compare(levels, boxes, labels, 8, 3, dtype=torch.float64)


def test_no_boxes_anywhere(levels):
    """All locations background: focal loss over everything / 1; no box or centerness loss."""
    empty, no_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    out, matched = compare(levels, [empty, empty], [no_labels] * 2, 5, 1)
    assert out["bbox_regression"] == 0 and out["bbox_ctrness"] == 0
    assert out["classification"] > 0 and (matched == -1).all()


def test_one_box_and_empty_image(levels):
    box = torch.tensor([[10.0, 20.0, 100.0, 150.0]])
    empty = torch.zeros(0, 4)
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]
    out, _ = compare(levels, [box, empty], labels, 4, 2)
    assert out["bbox_regression"] > 0 and out["bbox_ctrness"] > 0


def test_garbage_padding_everywhere_gives_finite_gradients(levels):
    """Every padding row NaN / inf / 1e38, labels out of range: nothing leaks."""
    anchors, per_level = levels
    valid = torch.tensor([[False, True, False, False], [False] * 4])
    for fill in (float("nan"), float("inf"), -float("inf"), 1e38):
        boxes = torch.full((2, 4, 4), fill)
        boxes[0, 1] = torch.tensor([30.0, 30.0, 90.0, 120.0])
        labels = torch.full((2, 4), 10**6)
        labels[0, 1] = 1
        head = [t.requires_grad_() for t in random_head(torch.Generator(), 2, anchors.shape[0])]
        out = fixed_fcos_loss(*head, anchors, per_level, boxes, labels, valid)
        sum(out.values()).backward()
        assert all(torch.isfinite(v) for v in out.values()) and out["bbox_regression"] > 0
        assert all(torch.isfinite(t.grad).all() for t in head)


def test_data_parallel_split_sums_to_the_global_loss(levels):
    """Two "ranks" of 2 images, each normalised by the global foreground count: the shares add
    up to the loss of the whole batch."""
    head, (anchors, per_level, *targets) = padded_case(levels, 9, batch=4)
    whole = fixed_fcos_loss(*head, anchors, per_level, *targets)
    parts = [
        fcos_loss_sums([t[r] for t in head], anchors, per_level, *(t[r] for t in targets))
        for r in (slice(0, 2), slice(2, 4))
    ]
    total = parts[0][3] + parts[1][3]  # the all-reduce
    assert parts[0][3] > 0 and parts[1][3] > 0
    shares = [fcos_normalise(*p[:3], total) for p in parts]
    for key in whole:
        torch.testing.assert_close(shares[0][key] + shares[1][key], whole[key])


def test_sums_take_the_options_object(levels):
    """`fcos_loss_sums(..., options)`: the radius changes the matching, and so the loss."""
    head, tensors = padded_case(levels, 4, batch=2)
    wide = fixed_fcos_loss(*head, *tensors, center_sampling_radius=3.0)
    options = FCOSLossOptions(center_sampling_radius=3.0)
    from_options = fcos_normalise(*fcos_loss_sums(head, *tensors, options))
    default = fcos_normalise(*fcos_loss_sums(head, *tensors))
    for key in wide:
        torch.testing.assert_close(from_options[key], wide[key], rtol=0, atol=0)
        assert not torch.equal(default[key], wide[key])  # the options were not ignored


def test_loss_ops_have_no_data_dependent_shapes(levels):
    """Forward and backward: no sync op, and the same ops with the same shapes whatever the
    number of valid boxes (0 included)."""
    anchors, per_level = levels
    recorder = OpRecorder()
    for seed, counts in enumerate([(0, 3), (5, 1), (6, 6)]):
        g = torch.Generator().manual_seed(seed)
        per_image = [random_boxes(g, n) for n in counts]  # 0 to 6 boxes in M = 6 rows
        classes = [torch.randint(0, NUM_CLASSES, (n,), generator=g) for n in counts]
        boxes, _, labels, valid = pad(per_image, classes, 6, g)
        head = [t.requires_grad_() for t in random_head(g, 2, anchors.shape[0])]
        with recorded_step(recorder):
            out = fixed_fcos_loss(*head, anchors, per_level, boxes, labels, valid)
            sum(out.values()).backward()
    assert len(recorder.steps) == 3
    assert_same_ops_every_step(recorder)
