"""fixed_batched_nms equals torchvision's batched_nms image by image (distinct scores), with
every shape static: random clustered sweeps batched 256 images per call, the edge cases, the
float-rounding details of torchvision's CPU kernel, and one compiled graph."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torchvision.ops import batched_nms, nms

from ssd_npu.models.nms import fixed_batched_nms, largest_not_above


def reference(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou: float, k: int, valid: Tensor
) -> list[Tensor]:
    """torchvision's batched_nms per image on the valid candidates, as indices of N, cut to k."""
    out = []
    for b in range(scores.shape[0]):
        v = torch.where(valid[b])[0]
        out.append(v[batched_nms(boxes[b][v], scores[b][v], idxs[b][v], iou)[:k]])
    return out


def assert_matches_torchvision(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou: float, k: int, valid: Tensor | None = None
) -> None:
    """fixed_batched_nms == torchvision per image; shapes, dtypes and the prefix mask checked."""
    keep, keep_valid = fixed_batched_nms(boxes, scores, idxs, iou, k, valid)
    batch = scores.shape[0]
    assert keep.shape == keep_valid.shape == (batch, k)
    assert keep.dtype == torch.int64 and keep_valid.dtype == torch.bool
    # keep_valid is a prefix of True; the slots after it hold index 0
    assert torch.equal(keep_valid, keep_valid.cummin(dim=1).values)
    assert not keep[~keep_valid].any()
    mask = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    for b, want in enumerate(reference(boxes, scores, idxs, iou, k, mask)):
        assert torch.equal(keep[b][keep_valid[b]], want), f"image {b}"


def distinct_scores(batch: int, n: int, g: torch.Generator) -> Tensor:
    """[B, N] scores, distinct within each image: a permutation of 0..N-1 plus < 0.5 noise."""
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    return perm.float() + 0.5 * torch.rand(batch, n, generator=g)


def clustered_case(
    batch: int, n: int, classes: int, g: torch.Generator, grid: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images with boxes in a few clusters (many overlaps near any threshold), some
    exact duplicates, some zero-area boxes, class ids in 0..classes-1, and a random share of
    absent candidates (some images none present). grid: integer coordinates (IoUs often land
    exactly on a threshold such as 0.5)."""
    centres = torch.rand(batch, 3, 2, generator=g) * 200
    pick = torch.randint(0, 3, (batch, n, 1), generator=g).expand(-1, -1, 2)
    xy = centres.gather(1, pick) + torch.randn(batch, n, 2, generator=g) * 6
    wh = torch.rand(batch, n, 2, generator=g) * 30 + 1
    if grid:
        xy, wh = xy.round(), wh.round()
    boxes = torch.cat([xy, xy + wh], dim=-1)
    copies = torch.rand(batch, n, generator=g) < 0.1  # exact duplicates of box 0
    boxes = torch.where(copies[..., None], boxes[:, :1], boxes)
    flat = torch.rand(batch, n, generator=g) < 0.1  # zero width (x2 = x1)
    boxes[..., 2] = torch.where(flat, boxes[..., 0], boxes[..., 2])
    idxs = torch.randint(0, classes, (batch, n), generator=g)
    present = torch.rand(batch, 1, generator=g) * 1.2  # share present; > 1: all
    valid = torch.rand(batch, n, generator=g) < present
    valid[:4] = False  # images with no candidate at all
    return boxes, distinct_scores(batch, n, g), idxs, valid


@pytest.mark.parametrize("classes", [1, 4, 91])
@pytest.mark.parametrize("grid", [False, True])
def test_random_clustered_images_match_torchvision(classes, grid):
    """3 thresholds x 256 images x 6 settings = 4608 random images, each compared."""
    g = torch.Generator().manual_seed(classes * 10 + grid)
    for iou, k in ((0.5, 7), (0.55, 48), (0.3, 100)):  # 48: exactly N; 100: more than N
        boxes, scores, idxs, valid = clustered_case(256, 48, classes, g, grid)
        assert_matches_torchvision(boxes, scores, idxs, iou, k, valid)


@pytest.mark.slow
def test_large_random_sweep_matches_torchvision():
    """A wider sweep: more thresholds (0 and 1 included), sizes and seeds."""
    g = torch.Generator().manual_seed(7)
    for iou in (0.0, 0.2, 0.45, 0.5, 0.6, 0.75, 0.9, 1.0):
        for n, classes, grid in ((16, 1, True), (64, 3, False), (128, 20, True), (96, 200, False)):
            boxes, scores, idxs, valid = clustered_case(256, n, classes, g, grid)
            assert_matches_torchvision(boxes, scores, idxs, iou, n // 3, valid)


def test_more_than_1000_candidates_use_torchvisions_unshifted_boxes():
    """Images with 1000 and 1001+ valid candidates: torchvision's CPU batched_nms switches from
    the class-shifted boxes to nms per class there; both sides of the switch match."""
    g = torch.Generator().manual_seed(3)
    boxes, scores, idxs, _ = clustered_case(4, 1100, 60, g)
    valid = torch.ones(4, 1100, dtype=torch.bool)
    valid[0, 1000:] = False  # 1000 valid: shifted
    valid[1, 1001:] = False  # 1001 valid: per class
    valid[2, ::2] = False  # 550 valid
    assert_matches_torchvision(boxes, scores, idxs, 0.5, 400, valid)


def test_the_class_shift_rounding_is_mirrored():
    """Two class-50 boxes with IoU just under 0.5: torchvision's shift by 50 x (max + 1) rounds
    their coordinates and it keeps both, while nms on the plain boxes suppresses one. The
    fixed version gives torchvision's answer on both sides of its 1000-box switch."""
    x = 10 / 3 - 7.5e-5  # IoU(A, B) = (10 - x) / (10 + x): a hair above 0.5
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [x, 0.0, x + 10, 10.0], [0.0, 0.0, 90.0, 90.0]])
    scores, idxs = torch.tensor([0.9, 0.8, 0.1]), torch.tensor([50, 50, 0])
    shifted = batched_nms(boxes, scores, idxs, 0.5)
    plain = nms(boxes[:2], scores[:2], 0.5)
    assert shifted.tolist() == [0, 1, 2] and plain.tolist() == [0]  # the case is a real one
    keep, keep_valid = fixed_batched_nms(boxes[None], scores[None], idxs[None], 0.5, 3)
    assert keep[0][keep_valid[0]].tolist() == [0, 1, 2]
    # the same pair among 1001 candidates (the others: one per class 100.., inside the same
    # max coordinate, so a shift would be the same): torchvision runs nms on plain boxes
    others = torch.tensor([20.0, 20.0, 21.0, 21.0]).repeat(998, 1)
    many = torch.cat([boxes, others])
    many_scores = torch.cat([scores, torch.linspace(0.05, 0.01, 998)])
    many_idxs = torch.cat([idxs, torch.arange(100, 1098)])
    assert_matches_torchvision(many[None], many_scores[None], many_idxs[None], 0.5, 1001)
    keep, keep_valid = fixed_batched_nms(many[None], many_scores[None], many_idxs[None], 0.5, 3)
    assert keep[0].tolist() == [0, 2, 3]


def test_iou_exactly_at_the_threshold_follows_torchvisions_double_comparison():
    """IoU 10/20 = 0.5 at threshold 0.5 is not suppressed (strictly greater); IoU 11/20 in
    float32 is fl(0.55) = 0.55000001 > 0.55 in double, so torchvision suppresses it at 0.55,
    where a float32 comparison (fl(0.55) > fl(0.55)) would keep it."""
    assert largest_not_above(0.55, torch.float32) < 0.55 < float(torch.tensor(0.55))
    scores, idxs = torch.tensor([[0.9, 0.8]]), torch.zeros(1, 2, dtype=torch.int64)
    for width, iou, kept in ((10.0, 0.5, [0, 1]), (11.0, 0.55, [0])):
        boxes = torch.tensor([[[0.0, 0.0, 20.0, 1.0], [0.0, 0.0, width, 1.0]]])
        assert nms(boxes[0], scores[0], iou).tolist() == kept
        keep, keep_valid = fixed_batched_nms(boxes, scores, idxs, iou, 2)
        assert keep[0][keep_valid[0]].tolist() == kept
    # float64 boxes: the threshold is compared as given
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 1.0], [0.0, 0.0, 11.0, 1.0]]], dtype=torch.float64)
    assert_matches_torchvision(boxes, scores.double(), idxs, 0.55, 2)


def test_edge_cases():
    """No candidates, N = 0, all suppressed, identical boxes across classes, zero-area boxes
    (never suppress, never suppressed, even identical ones), more survivors than max_output."""
    one = torch.tensor([10.0, 10.0, 50.0, 50.0])
    same = one.repeat(1, 6, 1)
    scores = torch.tensor([[0.1, 0.6, 0.3, 0.9, 0.5, 0.2]])
    zeros = torch.zeros(1, 6, dtype=torch.int64)
    # identical boxes, one class: only the best survives
    keep, keep_valid = fixed_batched_nms(same, scores, zeros, 0.5, 4)
    assert keep.tolist() == [[3, 0, 0, 0]] and keep_valid.tolist() == [[True] + [False] * 3]
    # identical boxes, six classes: all survive, cut to max_output in descending score
    classes = torch.arange(6)[None]
    assert_matches_torchvision(same, scores, classes, 0.5, 4)
    keep, _ = fixed_batched_nms(same, scores, classes, 0.5, 4)
    assert keep.tolist() == [[3, 1, 4, 2]]
    # no candidate present
    keep, keep_valid = fixed_batched_nms(same, scores, zeros, 0.5, 3, torch.zeros(1, 6).bool())
    assert not keep_valid.any() and not keep.any()
    # absent candidates may hold anything, NaN included: they change nothing
    junk_boxes, junk_scores = same.clone(), scores.clone()
    junk_boxes[0, 3], junk_scores[0, 1] = float("nan"), float("nan")
    absent = torch.tensor([[True, False, True, False, True, True]])
    keep, keep_valid = fixed_batched_nms(junk_boxes, junk_scores, classes, 0.5, 6, absent)
    assert keep[keep_valid].tolist() == [4, 2, 5, 0]
    # N = 0
    keep, keep_valid = fixed_batched_nms(
        torch.zeros(2, 0, 4), torch.zeros(2, 0), zeros[:, :0], 0.5, 3
    )
    assert keep.shape == (2, 3) and not keep_valid.any()
    # zero-area boxes: a point, a line inside the big box, two identical points
    flat = torch.tensor(
        [[[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 2.0, 6.0]]]
    )
    flat_scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    for iou in (0.0, 0.5):
        assert_matches_torchvision(flat, flat_scores, zeros[:, :4], iou, 4)
        keep, keep_valid = fixed_batched_nms(flat, flat_scores, zeros[:, :4], iou, 4)
        assert keep_valid.all() and keep.tolist() == [[0, 1, 2, 3]]


def test_compiles_to_one_graph_without_breaks():
    """torch.compile(dynamic=False): one graph, no graph break, the eager answer; the same
    graph serves other data of the same shapes (no recompile)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fixed_batched_nms, backend="aot_eager", dynamic=False)
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        boxes, scores, idxs, valid = clustered_case(8, 10, 3, g)
        got = compiled(boxes, scores, idxs, 0.5, 6, valid)
        want = fixed_batched_nms(boxes, scores, idxs, 0.5, 6, valid)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()
