"""SGD and the learning-rate schedule of torchvision's ssdlite recipe, scaled to the batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR


def scaled_lr(optim_cfg, global_batch: int) -> float:
    """`optim.lr` if set, else the recipe's lr scaled linearly: base_lr * global_batch / base_batch.

    The recipe is lr 0.15 at global batch 192 (8 devices x 24); batch 8 gives 0.00625.
    """
    if optim_cfg.lr is not None:
        return float(optim_cfg.lr)
    return optim_cfg.base_lr * global_batch / optim_cfg.base_batch


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg, global_batch: int):
    """SGD with momentum and weight decay, as the recipe (momentum 0.9, wd 4e-5)."""
    return torch.optim.SGD(
        params,
        lr=scaled_lr(optim_cfg, global_batch),
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int):
    """Per-step schedule: linear warm-up over `warmup_steps`, then cosine to 0 at `total_steps`."""
    warmup = max(0, min(optim_cfg.warmup_steps, total_steps - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=optim_cfg.warmup_factor, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
