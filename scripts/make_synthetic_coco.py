"""Write the deterministic synthetic COCO-format data set to a folder.

Usage:
    python scripts/make_synthetic_coco.py ROOT [--num-train 256] [--num-val 48] [--seed 0]

ROOT gets train2017/, val2017/ and annotations/instances_{train,val}2017.json; train with
`python train.py data=coco data.root=ROOT data.num_classes=6`. (`python train.py` alone
generates the same set in .cache/synthetic_coco on first use.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_npu.data.synthetic import make_synthetic_coco  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t = time.perf_counter()
    make_synthetic_coco(args.root, args.num_train, args.num_val, args.seed)
    print(
        f"wrote {args.num_train} train + {args.num_val} val images to {args.root} in {time.perf_counter() - t:.1f} s"
    )


if __name__ == "__main__":
    main()
