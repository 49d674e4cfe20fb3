"""The allowed values of every choice-valued setting, each listed once.

No imports on purpose: the config check (`ssd_npu.config`) and the modules that act on a
choice (`ssd_npu.data.fit`, `ssd_npu.data.decode`, ...) both read them from here, so a new fit
mode or decode mode is added in one place. The canvas is one type, `Canvas`: (H, W) pixels.
"""

from __future__ import annotations

from typing import NamedTuple

DEVICES = ("auto", "cpu", "cuda", "npu")
FITS = ("stretch", "letterbox", "pad")  # how an image meets the canvas (ssd_npu/data/fit.py)
SHAPES = ("fixed", "dynamic")  # the fixed-shape path, or torchvision's own
DATASETS = ("synthetic", "coco")
ON_BAD_IMAGE = ("fail", "skip")
# JPEG decoding (ssd_npu/data/decode.py); device: the workers read the bytes, the device decodes
# the batch (nvJPEG on cuda) into the slots of data.augment_on=device (ssd_npu/data/slots.py)
DECODES = ("exact", "reduced", "device")
# where the training augmentation (IoU crop, flip) and the fit to the canvas run on the fixed
# path; device: workers only decode into fixed-size slots (ssd_npu/data/slots.py), the step does
# the rest; auto: the device on cuda and npu, the host on the cpu
AUGMENT_ON = ("auto", "host", "device")
AMP_DTYPES = ("bf16", "fp16")
# where evaluation's postprocess (score threshold, top-k, NMS) runs on the fixed path; auto:
# the device on cuda and npu, the host on the cpu (faster there: docs/bench.md)
POSTPROCESS = ("auto", "device", "host")
# COCOeval's engine (ssd_npu/evaluation/cocoeval.py): faster-coco-eval, or pycocotools (the
# reference)
COCO_ENGINES = ("faster", "pycocotools")
# what eval.target_map is compared with: AP@[.5:.95] (COCO's mAP, MLPerf's) or AP@.5
TARGET_METRICS = ("mAP", "mAP50")
# torch.compile's `mode` (its docstring; inductor only): reduce-overhead and max-autotune use
# CUDA graphs on cuda, possible here because every shape of the fixed step is fixed
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# compiler.backend on device=npu: inductor with triton-ascend (the default: Ascend's first
# choice for training) or torch_npu's "npu" (torchair's GE graph mode, meant mainly for inference)
NPU_COMPILE_BACKENDS = ("inductor", "npu")
AUDIT_TARGETS = ("train", "eval")  # what scripts/audit_shapes.py records


class Canvas(NamedTuple):
    """The fixed input size every image is fitted to, in pixels (a tuple (H, W))."""

    height: int
    width: int

    @classmethod
    def of(cls, value: object) -> Canvas:
        """A canvas from any [H, W] pair (a config list, a tuple, a tensor of two numbers)."""
        height, width = value  # type: ignore[misc]
        return cls(int(height), int(width))
