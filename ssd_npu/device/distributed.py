"""Data-parallel training under torchrun: process group, rank roles, BatchNorm across ranks.

`torchrun --nproc_per_node=N train.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `init` joins
the process group with the device's backend (gloo on cpu, nccl on cuda, hccl on npu), bound
to the rank's device, and makes a gloo side group for numbers the host already holds (a stop
flag, a step time): reducing those over the device's group and reading the result would make
the host wait for every step queued before the collective. Without torchrun everything here
is a no-op for a world of one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from ssd_npu.device.backend import Device

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


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


# The gloo group of `host_all_reduce`, made by `init` (a separate group on cpu too, so that the
# cpu tests run the path cuda and npu take); None outside a process group.
_host_group: dist.ProcessGroup | None = None


def init(device: Device, timeout_min: int = 30) -> World:
    """Join torchrun's process group (if WORLD_SIZE > 1) with the device's backend.

    `timeout_min`: how long a rank waits in a collective before it fails, in minutes; it must
    cover rank 0's COCOeval and detection sheet, during which the other ranks wait in their
    next collective. cuda / npu: the group is bound to the rank's device (`device_id`, which
    torch requires to be an accelerator with an index), so NCCL connects at once and fails
    here, not at the first step.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    timeout = datetime.timedelta(minutes=timeout_min)
    if not dist.is_initialized():
        where = device.process_group_device
        bound = {"device_id": where} if where is not None else {}
        dist.init_process_group(backend=device.dist_backend, timeout=timeout, **bound)
    global _host_group
    _host_group = dist.new_group(backend="gloo", timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    global _host_group
    _host_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """A reduced copy over all ranks (not differentiable); the tensor itself in a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=_REDUCE_OPS[op])
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable) as a list on rank 0, None elsewhere; [obj] alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def host_all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Host numbers (ms, flags) summed (or max'ed: op="max") over all ranks; as given alone.

    They travel over the gloo side group as a cpu tensor, never through the device's queue:
    the host waits for the other ranks' hosts only, not for the steps queued on its device.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    if _host_group is None:
        raise RuntimeError("ssd_npu.device.distributed.init makes the host group: call it first.")
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=_host_group)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True if `flag` is True on any rank (a host vote: no device wait; `flag` alone)."""
    return host_all_reduce([float(flag)], op="max")[0] > 0.0


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
    if device.is_accelerator:
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
