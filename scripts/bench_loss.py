"""Benchmark: the fixed-shape loss against torchvision's matching + `compute_loss`.

Usage:
    python scripts/bench_loss.py [--repeats 7] [--block 5] [--out PATH] [--cases ssdlite,retinanet]

Both sides get the same head outputs (random logits and deltas, float32) and the same ground
truth, and both run forward and backward; nothing else of the step (no network, no data):

    torchvision   per image: `box_iou` + the model's matcher (SSDMatcher for SSD, the Matcher
                  inside `RetinaNet.compute_loss`), then `compute_loss`: what torchvision's
                  `SSD.forward` / `RetinaNet.forward` do in training after the head
    fixed         `ssd_loss_sums` + `normalise` (SSD) or `retinanet_loss_sums` +
                  `retinanet_normalise` (RetinaNet) on the padded `[B, M]` ground truth

Cases (the model's own anchors on its canvas, 91 classes as COCO, M = 32 box rows):

    ssdlite     ssdlite320_mobilenet_v3_large at 320x320, A = 3,234, batch 8
    retinanet   retinanet_resnet50_fpn at 512x512, A = 49,104, batch 2

The process runs with glibc's malloc told to keep freed memory (MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_, set by re-executing itself unless --system-malloc): by default glibc
maps every block over 32 MB afresh and returns it at free, so each call page-faults RetinaNet's
[B, A, C] tensors (36 MB at batch 2) anew, which made the batched loss 2-4x slower than the
same arithmetic in per-image pieces. A GPU's or an NPU's caching allocator keeps its blocks;
the setting removes an artefact of the CPU from a comparison of the loss's arithmetic.

Each image holds 1..16 boxes (COCO's mean is 7.3), 2-60% of the canvas side, drawn once from a
fixed seed. The two sides run in alternating blocks (`--block` calls of one, then of the other)
`--repeats` times, after one warm-up block each: the machine's speed drifts, and alternating
makes both sides see the same drift. Per block the median call; per side the median of its
blocks; the ratio fixed / torchvision per repeat, then its median and min-max.
Prints a markdown table and writes JSON (--out, default bench_out/bench_loss.json):
{"machine": {...}, "cases": {case: {"canvas", "batch", "max_boxes", "num_classes", "anchors",
"torchvision_ms", "fixed_ms", "fixed_vs_torchvision": {"median", "min", "max"}}}}. Times in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssd_npu  # noqa: E402, F401  (sets the torch environment before torch loads)

# isort: split
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.models import detection  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from ssd_npu.loss.retinanet import (  # noqa: E402
    RetinaNetLossOptions,
    retinanet_loss_sums,
    retinanet_normalise,
)
from ssd_npu.loss.ssd import SSDLossOptions, normalise, ssd_loss_sums  # noqa: E402
from ssd_npu.models.detector import canvas_anchors  # noqa: E402

NUM_CLASSES = 91
MAX_BOXES = 32


@dataclass(frozen=True)
class Case:
    builder: str  # torchvision.models.detection function
    canvas: int  # square canvas side, px
    batch: int


CASES = {
    "ssdlite": Case("ssdlite320_mobilenet_v3_large", 320, 8),
    "retinanet": Case("retinanet_resnet50_fpn", 512, 2),
}


@dataclass(frozen=True)
class GroundTruth:
    """One batch's boxes, compact (torchvision's targets) and padded (the fixed loss's)."""

    targets: list[dict[str, Tensor]]  # per image {"boxes": [n, 4] xyxy px, "labels": [n]}
    boxes: Tensor  # [B, M, 4] xyxy px, zero on padding rows
    labels: Tensor  # [B, M] int64
    valid: Tensor  # [B, M] bool


def ground_truth(batch: int, canvas: int, generator: torch.Generator) -> GroundTruth:
    """1..16 boxes an image, sides 2-60% of the canvas, labels 1..90; padded to MAX_BOXES."""
    targets = []
    boxes = torch.zeros(batch, MAX_BOXES, 4)
    labels = torch.zeros(batch, MAX_BOXES, dtype=torch.int64)
    valid = torch.zeros(batch, MAX_BOXES, dtype=torch.bool)
    for i in range(batch):
        count = int(torch.randint(1, 17, (1,), generator=generator))
        side = canvas * (0.02 + 0.58 * torch.rand(count, 2, generator=generator))
        corner = (canvas - side) * torch.rand(count, 2, generator=generator)
        image_boxes = torch.cat([corner, corner + side], dim=1)
        image_labels = torch.randint(1, NUM_CLASSES, (count,), generator=generator)
        targets.append({"boxes": image_boxes, "labels": image_labels})
        boxes[i, :count], labels[i, :count], valid[i, :count] = image_boxes, image_labels, True
    return GroundTruth(targets, boxes, labels, valid)


def loss_calls(case: Case, seed: int = 0) -> tuple[Callable[[], None], Callable[[], None], int]:
    """(torchvision's call, the fixed call, anchors): each runs forward and backward."""
    torch.manual_seed(seed)
    model = getattr(detection, case.builder)(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    )
    model.model_name = case.builder  # how ssd_npu knows a detector's family
    anchors = canvas_anchors(model, (case.canvas, case.canvas))
    g = torch.Generator().manual_seed(seed)
    truth = ground_truth(case.batch, case.canvas, g)
    num_anchors = anchors.shape[0]
    logits = (torch.randn(case.batch, num_anchors, NUM_CLASSES, generator=g) * 3).requires_grad_()
    deltas = torch.randn(case.batch, num_anchors, 4, generator=g).requires_grad_()
    head = {"cls_logits": logits, "bbox_regression": deltas}
    anchor_list = [anchors] * case.batch
    retinanet = isinstance(model, detection.RetinaNet)

    def torchvision_call() -> None:
        if retinanet:  # RetinaNet.compute_loss matches inside
            losses = model.compute_loss(truth.targets, head, anchor_list)
        else:
            matched = [model.proposal_matcher(box_iou(t["boxes"], anchors)) for t in truth.targets]
            losses = model.compute_loss(truth.targets, head, anchor_list, matched)
        sum(losses.values()).backward()

    padded = (anchors, truth.boxes, truth.labels, truth.valid)

    def fixed_call() -> None:
        if retinanet:
            sums = retinanet_loss_sums(logits, deltas, *padded, RetinaNetLossOptions())
            losses = retinanet_normalise(*sums)
        else:
            losses = normalise(*ssd_loss_sums(logits, deltas, *padded, SSDLossOptions()))
        sum(losses.values()).backward()

    return torchvision_call, fixed_call, num_anchors


def block_ms(call: Callable[[], None], calls: int) -> float:
    """Median wall time of `calls` calls, ms."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(case: Case, repeats: int, block: int) -> dict[str, object]:
    torchvision_call, fixed_call, num_anchors = loss_calls(case)
    block_ms(torchvision_call, block)  # warm-up: allocator, first-call costs
    block_ms(fixed_call, block)
    tv_blocks, fixed_blocks, ratios = [], [], []
    for repeat in range(repeats):
        order = (
            (torchvision_call, fixed_call) if repeat % 2 == 0 else (fixed_call, torchvision_call)
        )
        times = {call: block_ms(call, block) for call in order}
        tv_blocks.append(times[torchvision_call])
        fixed_blocks.append(times[fixed_call])
        ratios.append(times[fixed_call] / times[torchvision_call])
    return {
        "builder": case.builder,
        "canvas": [case.canvas, case.canvas],
        "batch": case.batch,
        "max_boxes": MAX_BOXES,
        "num_classes": NUM_CLASSES,
        "anchors": num_anchors,
        "torchvision_ms": round(statistics.median(tv_blocks), 2),
        "fixed_ms": round(statistics.median(fixed_blocks), 2),
        "fixed_vs_torchvision": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
    }


# glibc's defaults map blocks over 32 MB with mmap and unmap them at free; these keep them.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
}


def keep_freed_memory() -> None:
    """Re-execute this script with KEEP_FREED_MEMORY in its environment (glibc reads it at
    start), unless it is already there."""
    if all(os.environ.get(key) == value for key, value in KEEP_FREED_MEMORY.items()):
        return
    os.environ.update(KEEP_FREED_MEMORY)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating blocks per side")
    parser.add_argument("--block", type=int, default=5, help="calls per block")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    parser.add_argument(
        "--system-malloc", action="store_true", help="keep glibc's defaults (see the docstring)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/bench_loss.json"))
    args = parser.parse_args()
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown or args.repeats < 1 or args.block < 1:
        parser.error(f"--cases takes {', '.join(CASES)} (got {unknown}); --repeats/--block >= 1")

    if not args.system_malloc:
        keep_freed_memory()
    results = {name: measure(CASES[name], args.repeats, args.block) for name in names}
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cpu",
            "malloc": "glibc defaults" if args.system_malloc else KEEP_FREED_MEMORY,
        },
        "repeats": args.repeats,
        "block": args.block,
        "cases": results,
    }
    print(
        "| case | canvas | B x M | anchors | torchvision ms | fixed ms | fixed / torchvision (min-max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        ratio = row["fixed_vs_torchvision"]
        print(
            f"| {name} | {row['canvas'][0]} | {row['batch']} x {row['max_boxes']} | "
            f"{row['anchors']:,} | {row['torchvision_ms']} | {row['fixed_ms']} | "
            f"{ratio['median']} ({ratio['min']}-{ratio['max']}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
