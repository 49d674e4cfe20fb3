"""Fixed-shape losses, each equal to torchvision's own for any batch and padding.

One module per family's loss (`ssd`, `retinanet`, `fcos`) and the pieces they share
(`common`). `ssd_npu.loss.fixed_ssd_loss` is the public import path of the SSD loss.
"""

from ssd_npu.loss.ssd import fixed_ssd_loss

__all__ = ["fixed_ssd_loss"]
