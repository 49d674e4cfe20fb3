"""Data-parallel training under torchrun: process group, rank roles, BatchNorm across ranks.

`torchrun --nproc_per_node=N train.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `init` joins
the process group with the device's backend (gloo on cpu, nccl on cuda, hccl on npu).
Without torchrun everything here is a no-op for a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from ssd_npu.device import Device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes TensorBoard, summary.json and checkpoints."""
        return self.rank == 0


def init(device: Device) -> World:
    """Join torchrun's process group (if WORLD_SIZE > 1) with the device's backend."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend=device.dist_backend)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """A reduced copy over all ranks (not differentiable); the tensor itself in a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable) as a list on rank 0, None elsewhere; [obj] alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def any_rank(flag: bool, device: Device) -> bool:
    """True if `flag` is True on any rank (a no-op in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=device.torch), op="max").item())


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank.

    torch's SyncBatchNorm only runs on accelerators (it rejects CPU tensors); this one works
    on any device and backend, gloo included, with differentiable all-reduces of the
    per-channel sums (two passes: mean, then the centred sum of squares, for accuracy).
    In eval mode, or in a world of one, it is exactly nn.BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor(
            float(x.shape[0] * x.shape[2] * x.shape[3]), device=x.device, dtype=x.dtype
        )
        count = all_reduce(count)
        mean = dist_fn.all_reduce(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def convert_sync_batchnorm(module: nn.Module, device: Device) -> nn.Module:
    """BatchNorm -> statistics over all ranks: torch's SyncBatchNorm on cuda/npu, ours on cpu."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CrossRankBatchNorm2d):
            new = CrossRankBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
