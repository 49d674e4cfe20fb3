"""Run a script with cuDNN's algorithm search pinned on or off, whatever the script sets.

Usage (what scripts/gpu_check.py does for its fair baseline):
    GPU_CHECK_CUDNN_BENCHMARK=1 python scripts/cudnn_pin.py train.py [overrides ...]

train.py chooses `torch.backends.cudnn.benchmark` itself: on for shape=fixed on cuda, off
for shape=dynamic, though torchvision's transform resizes every batch of ssdlite to one
320x320 canvas, so its convolutions see one shape too. There is no config key for it
(a `device.cudnn_benchmark` would be the product's way), so for a comparison on equal terms
this runs the script with every assignment to the flag replaced by the pinned value:
GPU_CHECK_CUDNN_BENCHMARK=1 pins it on, 0 off.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch (see ssd_npu)

import runpy  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch.backends import ContextProp, cudnn  # noqa: E402


def pin(on: bool) -> None:
    """Set torch.backends.cudnn.benchmark to `on` and make later assignments keep it."""
    torch._C._set_cudnn_benchmark(on)
    type(cudnn).benchmark = ContextProp(
        torch._C._get_cudnn_benchmark, lambda _asked: torch._C._set_cudnn_benchmark(on)
    )


def main() -> None:
    pin(os.environ.get("GPU_CHECK_CUDNN_BENCHMARK", "1") == "1")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the script sees its own argv, as if started directly
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
