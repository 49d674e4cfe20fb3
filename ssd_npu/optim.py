"""SGD and the learning-rate schedule of torchvision's ssdlite recipe, scaled to the batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def scaled_lr(lr: float | None, base_lr: float, base_batch: int, global_batch: int) -> float:
    """`lr` if set, else the recipe's lr scaled linearly: base_lr * global_batch / base_batch.

    The recipe is lr 0.15 at global batch 192 (8 devices x 24); batch 8 gives 0.00625.
    """
    return float(lr) if lr is not None else base_lr * global_batch / base_batch


def build_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with momentum and weight decay, as the recipe (momentum 0.9, wd 4e-5)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, warmup_factor: float, total_steps: int
) -> LRScheduler:
    """Per-step schedule: linear warm-up over `warmup_steps` (from `warmup_factor` x lr), then
    cosine to 0 at `total_steps`."""
    warmup = max(0, min(warmup_steps, total_steps - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=warmup_factor, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
