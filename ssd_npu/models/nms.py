"""Fixed-size batched NMS: torchvision's `batched_nms` with every shape static.

`fixed_batched_nms(boxes [B, N, 4], scores [B, N], idxs [B, N], iou_threshold, max_output,
valid [B, N])` returns `keep [B, K]` (int64 indices into N, descending score) and
`keep_valid [B, K]`, K = max_output. No `nonzero`, boolean indexing, `.item()` or branch on
data: a shape-compiling device (Ascend NPU, `torch.compile(dynamic=False)`) compiles it once.

Algorithm (exact greedy NMS, the order torchvision's kernel visits the boxes):
1. sort each image's candidates by descending score (stable: ties by index);
2. the suppression matrix `S [B, N, N]`: `S[i, j]` = candidates i and j have the same class
   and IoU(i, j) > iou_threshold, computed as torchvision's CPU kernel does (below);
3. a loop over the N sorted positions: position i is kept iff it is valid and no kept earlier
   position suppresses it; each step is one vectorised update of a `removed [B, N]` mask;
4. the first K kept positions, mapped back to indices of N.

Cost: memory B x N x N bools for S (plus, in eager mode, float intermediates of at most
B x ROW_CHUNK x N); time O(B x N^2) for S and O(B x N^2) for the loop, which is N sequential
steps (N unrolled steps in a compiled graph: keep N in the hundreds or low thousands).

When it is exact (for distinct scores): `keep[b][keep_valid[b]]` equals
`torchvision.ops.batched_nms(boxes[b][v], scores[b][v], idxs[b][v], iou_threshold)[:K]` on
the CPU, mapped to indices of N (v the valid candidates), because every IoU decision is
made from the same float operations, rounded the same way (in eager mode; a compiler that
fuses a multiply-add may round an IoU at the threshold differently):
- the IoU is the kernel's: area = (x2 - x1) * (y2 - y1), inter = max(0, w) * max(0, h),
  ovr = inter / (area_i + area_j - inter), suppressed iff ovr > iou_threshold, compared in
  double (a float32 IoU of fl(0.55) suppresses at threshold 0.55). A zero-area pair gives
  0 / 0 = NaN there, which never suppresses; here that pair is masked (no NaN is made);
- torchvision's CPU `batched_nms` shifts each box by class * (max coordinate + 1) (the
  "coordinate trick") when the image has at most 1000 candidates, and runs `nms` per class on
  the unshifted boxes above that. The shift rounds coordinates (at offset ~30000 a float32
  step is 0.002 px), which moves IoUs near the threshold, so the same IoU inputs are used
  here: shifted when the image has <= 1000 valid candidates. (torchvision on CUDA shifts up to
  25000 boxes: a CUDA reference can differ at IoUs within rounding of the threshold.)
- classes never suppress each other here; torchvision's shift breaks that for boxes with
  coordinates below -1 (offsets then overlap), a case clipped detections never reach.
With tied scores the kept set can differ where torchvision's sort orders the tie otherwise.
float32 / float64 boxes are used as given; other dtypes are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# torchvision's CPU batched_nms uses the coordinate trick up to 4000 coordinates (1000 boxes).
TORCHVISION_CPU_SHIFT_MAX_BOXES = 1000
# Rows of the IoU matrix computed at once: bounds eager-mode float intermediates.
ROW_CHUNK = 1024


def fixed_batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    max_output: int,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """torchvision's `batched_nms` per image, every shape static (see the module docstring).

    boxes [B, N, 4] xyxy (any unit); scores [B, N]; idxs [B, N] int class ids (different
    classes never suppress each other); valid [B, N] bool (False: an absent candidate; None:
    all present). Returns keep [B, K] int64 indices into N, in descending score (0 where
    invalid), and keep_valid [B, K] bool (a prefix of True), K = max_output.
    """
    batch, n = scores.shape
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    if n == 0:  # a static shape: nothing to sort or loop over
        empty = torch.zeros(batch, max_output, dtype=torch.int64, device=scores.device)
        return empty, empty.bool()
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, N]
    boxes = boxes.to(compute_dtype(boxes.dtype))
    sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    sorted_idxs, sorted_valid = idxs.gather(1, order), valid.gather(1, order)
    coords = torchvision_coordinates(sorted_boxes, sorted_idxs, sorted_valid)
    suppress = suppression_matrix(coords, iou_threshold, sorted_idxs)  # [B, N, N]
    kept = greedy_keep(suppress, sorted_valid)
    position, keep_valid = first_kept(kept, max_output)
    return order.gather(1, position).masked_fill(~keep_valid, 0), keep_valid


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything else (float32, half, bfloat16, ints) is done in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def largest_not_above(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` number <= value (value a normal number; float32 or float64).

    torchvision compares a float IoU with the threshold in double; `iou > this` in `dtype` is
    that same test. Plain Python math: dynamo folds it to a constant (no graph break).
    """
    bits = 53 if dtype == torch.float64 else 24  # significand bits
    mantissa, exponent = math.frexp(value)
    return math.ldexp(math.floor(mantissa * 2**bits), exponent - bits)


def torchvision_coordinates(boxes: Tensor, idxs: Tensor, valid: Tensor) -> Tensor:
    """The coordinates torchvision's CPU `batched_nms` computes IoUs from.

    boxes [B, N, 4] xyxy; idxs [B, N] int; valid [B, N] bool -> [B, N, 4] same dtype: boxes +
    idxs * (max valid coordinate + 1) where an image has <= 1000 valid candidates (its
    coordinate trick, with its float rounding), the boxes unchanged above that (nms per class).
    """
    present = valid[..., None].expand_as(boxes)
    top = boxes.masked_fill(~present, float("-inf")).amax(dim=(-2, -1))  # [B]
    top = torch.where(valid.any(dim=-1), top, torch.zeros_like(top))  # no -inf offsets
    offsets = idxs.to(boxes.dtype) * (top + 1)[:, None]  # [B, N], as torchvision rounds it
    shifted = boxes + offsets[..., None]
    plain = valid.sum(dim=-1) > TORCHVISION_CPU_SHIFT_MAX_BOXES  # [B]
    return torch.where(plain[:, None, None], boxes, shifted)


def suppression_matrix(
    coords: Tensor, iou_threshold: float, classes: Tensor | None = None
) -> Tensor:
    """coords [..., N, 4] xyxy -> [..., N, N] bool: IoU(i, j) > iou_threshold, as torchvision's
    CPU nms kernel decides it (its arithmetic, its double comparison; 0 / 0 never suppresses),
    and, given classes [..., N], classes[i] == classes[j].
    """
    threshold = largest_not_above(iou_threshold, coords.dtype)
    x1, y1, x2, y2 = coords.unbind(-1)  # [..., N] each
    area = (x2 - x1) * (y2 - y1)
    rows = []
    for start in range(0, coords.shape[-2], ROW_CHUNK):
        part = slice(start, start + ROW_CHUNK)
        # In place on each fresh [..., rows, N] buffer (nothing here needs a gradient): the
        # same float operations with a third of the large allocations.
        inter = torch.minimum(x2[..., part, None], x2[..., None, :])
        inter = inter.sub_(torch.maximum(x1[..., part, None], x1[..., None, :])).clamp_(min=0)
        h = torch.minimum(y2[..., part, None], y2[..., None, :])
        inter.mul_(h.sub_(torch.maximum(y1[..., part, None], y1[..., None, :])).clamp_(min=0))
        union = (area[..., part, None] + area[..., None, :]).sub_(inter)
        empty = union == 0  # both boxes zero-area: torchvision's 0 / 0 = NaN, never > t
        ovr = inter.div_(union.masked_fill_(empty, 1.0))
        suppress = (ovr > threshold).logical_and_(~empty)
        if classes is not None:
            suppress.logical_and_(classes[..., part, None] == classes[..., None, :])
        rows.append(suppress)
    return torch.cat(rows, dim=-2)


def greedy_keep(suppress: Tensor, valid: Tensor) -> Tensor:
    """Exact greedy NMS over positions already sorted by descending score.

    suppress [..., N, N] bool (i suppresses j); valid [..., N] bool -> kept [..., N] bool:
    position i is kept iff valid and no kept position before it suppresses it. N steps, each
    O(numel of valid): reading row i of S, one AND, one OR.
    """
    removed = ~valid
    kept = []
    for i in range(valid.shape[-1]):
        keep_i = ~removed[..., i]
        kept.append(keep_i)
        removed = removed | (keep_i[..., None] & suppress[..., i, :])
    return torch.stack(kept, dim=-1)


def first_kept(kept: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """kept [..., N] bool -> (positions [..., k] int64 of the first k True, in order, 0 where
    missing; valid [..., k] bool). A scatter into k + 1 slots: kept position r goes to slot
    r (its rank), everything else to the spare slot k, which is dropped."""
    rank = kept.long().cumsum(dim=-1) - 1
    slot = torch.where(kept & (rank < k), rank, torch.full_like(rank, k))
    position = torch.arange(kept.shape[-1], device=kept.device).expand_as(rank)
    out = torch.zeros(*kept.shape[:-1], k + 1, dtype=torch.int64, device=kept.device)
    out = out.scatter(-1, slot, position)[..., :k]
    count = kept.sum(dim=-1, keepdim=True)
    return out, torch.arange(k, device=kept.device) < count
