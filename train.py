"""Train ssdlite320 with every device-side shape fixed (or the dynamic baseline).

Usage: python train.py [device=cpu|cuda|npu|auto] [canvas=[H,W]] [max_boxes=N] [fit=...]
       [shape=fixed|dynamic] [compile=true] [max_steps=N] [data=coco data.root=/path] ...
(installed with pip: `ssd-npu-train` takes the same overrides)
"""

from ssd_npu.cli import main

if __name__ == "__main__":
    main()
