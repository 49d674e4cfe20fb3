"""Data-set memory benchmark: build time, main-process RSS and forked workers' private memory.

Usage:
    python scripts/bench_memory.py [--images 118287] [--workers 2] [--dir DIR] [--out FILE]

Writes a COCO-train2017-sized annotation file (`--images` entries, 7.6 boxes each with
segmentation polygons, about 527 MB at full size: `ssd_npu.tools.memory.write_coco_like`)
whose file names point at a few real-world-sized JPEGs (`scripts/make_photo_coco.py`), into
DIR (kept and reused if there). Then, each in a fresh process, for

    before  the previous reader: a pycocotools index of the file (`CocoIndexTargets`)
    after   `CocoDetectionDataset` (flat numpy arrays, its workers gc.freeze() as the
            training loader's do)

it builds the training set (timed: build_s), reads the main process's RSS, forks `--workers`
readers that each read their share of one epoch of targets (path, size, boxes: no decoding,
as a DataLoader worker's epoch) and reports each one's private memory (Private_Clean +
Private_Dirty of /proc/<pid>/smaps_rollup: what the fork no longer shares). Prints a table;
writes a JSON file (`--out`, default bench_memory.json):
{"data": {...}, "before": {"build_s", "rss_mb", "worker_private_mb": [...]}, "after": {...}}.
Memory figures hold under load; build_s does not (a shared CPU slows it): compare the two
only when measured side by side, as here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SPLIT = "train2017"


def prepare(root: Path, images: int) -> dict[str, int | float]:
    """The annotation file and its few JPEGs under root (written once, then reused)."""
    from make_photo_coco import make_photo_coco

    from ssd_npu.tools.memory import write_coco_like

    ann = root / "annotations" / f"instances_{SPLIT}.json"
    meta = root / "bench_memory_data.json"
    if meta.is_file() and json.loads(meta.read_text())["images"] == images and ann.is_file():
        return json.loads(meta.read_text())
    make_photo_coco(root, num_train=4, num_val=1)  # the real JPEGs all entries point at
    photos = sorted(p.name for p in (root / SPLIT).glob("*.jpg"))
    boxes = write_coco_like(ann, images, photos)
    info = {"images": images, "boxes": boxes, "json_mb": round(ann.stat().st_size / 2**20, 1)}
    meta.write_text(json.dumps(info))
    return info


def measure(root: Path, variant: str, workers: int) -> dict[str, object]:
    """One variant in this (fresh) process: build, RSS, forked readers' private memory."""
    from ssd_npu.data.coco import CocoDetectionDataset
    from ssd_npu.tools.memory import CocoIndexTargets, fork_readers, read_flat, rss_mb

    start = time.perf_counter()
    if variant == "before":
        ref = CocoIndexTargets(root / "annotations" / f"instances_{SPLIT}.json", root / SPLIT)
        build_s = time.perf_counter() - start
        read, n, freeze = ref.read, len(ref.ids), False
    else:
        ds = CocoDetectionDataset(root, SPLIT)
        build_s = time.perf_counter() - start
        n, freeze = len(ds), True

        def read(i: int) -> None:
            read_flat(ds, i)

    rss = rss_mb()
    private = fork_readers(read, n, workers, freeze=freeze)
    return {
        "build_s": round(build_s, 2),
        "rss_mb": round(rss, 1),
        "worker_private_mb": [round(v, 1) for v in private],
    }


def baseline_rss_mb() -> float:
    """RSS of a process that imported what the variants import and built nothing."""
    import ssd_npu.data.coco  # noqa: F401
    from ssd_npu.tools.memory import rss_mb

    return round(rss_mb(), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_memory_coco"))
    parser.add_argument("--out", type=Path, default=Path("bench_memory.json"))
    parser.add_argument(
        "--measure", choices=("before", "after", "baseline"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure == "baseline":
        print(json.dumps(baseline_rss_mb()))
        return
    if args.measure:
        print(json.dumps(measure(args.dir, args.measure, args.workers)))
        return
    result: dict[str, object] = {"data": prepare(args.dir, args.images), "cpus": os.cpu_count()}
    for variant in ("baseline", "before", "after"):  # each in a fresh process: a clean RSS
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--measure", variant]
        proc = subprocess.run(
            [*cmd, "--workers", str(args.workers)], capture_output=True, text=True, check=True
        )
        result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    d = result["data"]
    lines = [
        f"{d['images']} images, {d['boxes']} boxes, {d['json_mb']} MB of JSON; "
        f"imports alone: {result['baseline']} MB RSS",
        "| reader | build s | main RSS MB | private MB per worker after an epoch |",
        "|---|---|---|---|",
    ]
    for name in ("before", "after"):
        r = result[name]
        private = ", ".join(f"{v:.1f}" for v in r["worker_private_mb"])
        lines.append(f"| {name} | {r['build_s']:.1f} | {r['rss_mb']:.0f} | {private} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
