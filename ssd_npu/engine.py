"""The training loop and its two step functions: fixed shapes, and torchvision's dynamic path.

The loop takes built objects (model step, optimizer, loader, device, telemetry), not the
config, as torchvision's references/detection engine does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from ssd_npu.compiler import compile_fn, graphs_compiled
from ssd_npu.device import Device
from ssd_npu.distributed import World, all_reduce
from ssd_npu.errors import UserError
from ssd_npu.loss import fixed_ssd_loss, normalise, ssd_loss_sums
from ssd_npu.model import FixedSSD
from ssd_npu.telemetry import Telemetry

StepFn = Callable[[object], dict[str, Tensor]]


# Per-batch data counters (degenerate / clipped boxes, skipped images, images scaled down
# by fit=pad) summed into summary.json's `data_counts`.
DATA_COUNTS = ("degenerate", "clipped", "skipped", "downscaled")


class NonFiniteLoss(UserError):
    """Training produced a NaN or infinite loss; the message names the step and the terms."""


@dataclass(frozen=True)
class StepOptions:
    """How a step function runs: mixed precision, compilation, data parallel."""

    amp: bool = False
    amp_dtype: str | None = None  # bf16 | fp16; None: the device's default
    compile: bool = False
    backend: str = "inductor"
    # ssd_npu.compiler.CompiledStep options: fail_on_recompile, recompile_limit, fail_on_limit
    compile_options: dict | None = None
    network: Callable | None = None  # what to call instead of the model (a DDP wrapper)
    world: World | None = None

    def maybe_compile(self, fn: Callable) -> Callable:
        return compile_fn(fn, self.backend, **(self.compile_options or {})) if self.compile else fn


def make_fixed_step(
    model: FixedSSD, device: Device, options: StepOptions = StepOptions()
) -> StepFn:
    """Loss of one FixedBatch: network (optionally autocast) + fixed_ssd_loss in fp32.

    `options.network` is the module to call (DistributedDataParallel-wrapped under torchrun;
    default `model`). In a world of several ranks the loss is divided by the foreground count
    of the global batch (all-reduced), as one process would divide on the whole batch.

    With `compile`, the forward and loss become one graph (`dynamic=False`: one compile per
    input shape, exactly like an NPU's online operator compile); backward follows it.
    """
    box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    network = options.network or model
    distributed = options.world is not None and options.world.distributed

    def losses(images: Tensor, boxes: Tensor, labels: Tensor, valid: Tensor) -> dict[str, Tensor]:
        with device.autocast(options.amp, options.amp_dtype):
            cls_logits, bbox_regression = network(images)
        # The loss runs in the anchors' precision (fp32) whatever autocast gave the network.
        dtype = model.anchors.dtype
        args = (
            cls_logits.to(dtype),
            bbox_regression.to(dtype),
            model.anchors,
            boxes,
            labels,
            valid,
        )
        if not distributed:
            return fixed_ssd_loss(*args, box_coder)
        bbox_sum, cls_sum, num_foreground = ssd_loss_sums(*args, box_coder)
        return normalise(bbox_sum, cls_sum, all_reduce(num_foreground))

    fn = options.maybe_compile(losses)

    def step(batch) -> dict[str, Tensor]:
        return fn(batch.images, batch.boxes, batch.labels, batch.valid)

    step.compiled = fn if options.compile else None  # graphs / recompiles for the summary
    return step


def make_dynamic_step(
    model: FixedSSD, device: Device, options: StepOptions = StepOptions()
) -> StepFn:
    """torchvision's unmodified path: `detector(list_of_images, targets)` -> its loss dict.

    `options.network`: the detector to call (DDP-wrapped under torchrun). Its loss is
    normalised by each rank's own positives, as torchvision's reference does.
    """
    fn = options.maybe_compile(options.network or model.detector)

    def step(batch) -> dict[str, Tensor]:
        with device.autocast(options.amp, options.amp_dtype):
            return fn(batch.images, batch.targets)

    step.compiled = fn if options.compile else None
    return step


@dataclass
class Progress:
    """Where training stands: the epoch being run, its batches done, optimizer steps done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def train_loop(
    step_fn: StepFn,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loader: Iterable,
    device: Device,
    telemetry: Telemetry,
    epochs: int,
    max_steps: int | None = None,
    count_graphs: bool = False,
    progress: Progress | None = None,
    on_step_end: Callable[[Progress], None] | None = None,
    on_epoch_end: Callable[[Progress], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    world: World | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Progress:
    """Train until `epochs` are done, `max_steps` optimizer steps, or `stop_requested()`.

    `progress` resumes mid-epoch: the loader's sampler skips the batches already trained on
    (`skip_next`), so a resumed run sees exactly the batches an uninterrupted one would.
    Timing: `data_ms` is the wait for the next batch (host pipeline + copy to the device);
    `step_ms` runs from the batch being on the device to the optimizer step having finished
    on it (the device is synchronised before the clock is read).
    Under DDP (`world` of several ranks) gradients are averaged over ranks, so the backward
    uses world-size x the loss (each rank's loss is already divided by the global positives);
    logged losses are summed over ranks and times are the slowest rank's. `scaler`: a
    GradScaler for fp16 autocast.
    """
    progress = progress or Progress()
    world = world or World()
    # a bucketed loader (max_boxes=[...]) keeps the epoch and skip state in its batch sampler
    sampler = getattr(loader, "batch_sampler", None)
    if not hasattr(sampler, "skip_next"):
        sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None) or getattr(sampler, "batch_size", None)
    while progress.epoch < epochs:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(progress.epoch)
        if progress.batch and hasattr(sampler, "skip_next"):
            sampler.skip_next(progress.batch * batch_size)
        data_start = perf_counter()
        for batch in loader:
            batch = batch.to(device.torch)
            device.synchronize()
            step_start = perf_counter()
            losses = step_fn(batch)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            backward = total * world.size if world.distributed else total
            if scaler is not None:
                scaler.scale(backward).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                backward.backward()
                optimizer.step()
            device.synchronize()
            step_end = perf_counter()

            # Reading the losses is a device-to-host sync, made on purpose, after the clock.
            names = ["total", *losses]
            reduced = all_reduce(torch.stack([total.detach(), *losses.values()]).float())
            values = {name: reduced[i].item() for i, name in enumerate(names)}
            step_ms, data_ms = (step_end - step_start) * 1000.0, (step_start - data_start) * 1000.0
            if world.distributed:  # the slowest rank sets the pace
                times = torch.tensor([step_ms, data_ms], device=device.torch)
                step_ms, data_ms = all_reduce(times, op="max").tolist()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            progress.step += 1
            progress.batch += 1
            if not all(math.isfinite(v) for v in values.values()):
                terms = ", ".join(f"{k}={v}" for k, v in values.items())
                raise NonFiniteLoss(
                    f"training stopped at step {progress.step} (epoch {progress.epoch}): the loss "
                    f"is not finite ({terms}). Lower the learning rate (optim.lr) or check the "
                    "data of this batch."
                )
            telemetry.log_step(
                progress.step,
                step_ms,
                data_ms,
                batch_size=len(batch.image_ids) * world.size,
                losses=values,
                lr=lr,
                boxes_dropped=getattr(batch, "boxes_dropped", 0),
                graphs=graphs_compiled() if count_graphs else None,
                data_counts={k: getattr(batch, k, 0) for k in DATA_COUNTS},
            )
            if on_step_end is not None:
                on_step_end(progress)
            if max_steps is not None and progress.step >= max_steps:
                return progress
            if stop_requested is not None and stop_requested():
                return progress
            data_start = perf_counter()
        progress.epoch += 1
        progress.batch = 0
        if on_epoch_end is not None:
            on_epoch_end(progress)
    return progress
