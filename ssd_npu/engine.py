"""The training loop: built objects in (step, optimizer, loader, telemetry), hooks at its seams.

As torchvision's references/detection engine, the loop takes built objects, not the config;
as detectron2's trainer, everything around the step (checkpoints, evaluation, the profiler,
bucket counting, stop signals) is a `Hook` in a list.

The host never waits for the device inside the steady loop: a step's losses and its device
time are copied/timed with marks and read one step late, after the next step has been queued
(`Device.mark`, `Device.to_host`). Under torchrun, what the ranks agree on from host numbers
(the slowest rank's times, the stop vote) goes over a gloo side group
(`distributed.host_all_reduce`), not through the device's queue. Steps a hook must see exactly
(a checkpoint, the end of an epoch, the last step) are read at once instead (`Hook.sync_after`).
A non-finite loss stops training when it is read, at most one step later, naming the step it
came from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from time import perf_counter

import torch

from ssd_npu.data.dynamic import DynamicBatch
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.data.samplers import ResumableSampler
from ssd_npu.device import Device, HostCopy, Mark
from ssd_npu.distributed import World, all_reduce, host_all_reduce
from ssd_npu.errors import UserError
from ssd_npu.optim import OptimizerStep
from ssd_npu.step import TrainStep
from ssd_npu.telemetry import Telemetry

Batch = FixedBatch | DynamicBatch

# Per-batch data counters (degenerate / clipped boxes, skipped images, images scaled down
# by fit=pad) summed into summary.json's `data_counts`.
DATA_COUNTS = ("degenerate", "clipped", "skipped", "downscaled")


class NonFiniteLoss(UserError):
    """Training produced a NaN or infinite loss; the message names the step and the terms."""


@dataclass
class Progress:
    """Where training stands: the epoch being run, its batches done, optimizer steps done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class StepRecord:
    """One queued step, until its results are read: what the hooks and telemetry get."""

    step: int  # 1-based optimizer step
    epoch: int
    batch: Batch
    data_ms: float  # host wait for this batch
    lr: float
    start: Mark
    end: Mark
    losses: HostCopy  # total, then each term, as queued on the device
    names: list[str]
    graphs: int  # graphs the step compiled when it was queued (0 when eager)
    step_ms: float = 0.0  # filled when read: device time of the step
    values: dict[str, float] = field(default_factory=dict)  # filled when read


class Hook:
    """A seam of the loop; override what you need (all no-ops here). Called in list order.

    before_train(progress)      once, before the first batch (also when resuming)
    before_step(progress)       the batch is on the device; the step is about to be queued
    after_update(progress)      the step (forward, loss, backward, optimizer) is queued and
                                nothing of it read yet: work after this is not the step's
    sync_after(progress) -> bool  True: read this step's results at once (the model then is
                                exactly as after it), e.g. to checkpoint it; else one step late
    after_step(record, progress)  a step's results were read and logged (record.step may be
                                progress.step - 1: the model is then one step further)
    after_epoch(progress)       all of an epoch's steps read
    should_stop() -> bool       asked once per queued step; True: read it, end training
    after_train(progress, failed)  always; `failed`: training raised (a non-finite loss...)
    """

    def before_train(self, progress: Progress) -> None: ...

    def before_step(self, progress: Progress) -> None: ...

    def after_update(self, progress: Progress) -> None: ...

    def sync_after(self, progress: Progress) -> bool:
        return False

    def after_step(self, record: StepRecord, progress: Progress) -> None: ...

    def after_epoch(self, progress: Progress) -> None: ...

    def should_stop(self) -> bool:
        return False

    def after_train(self, progress: Progress, failed: bool) -> None: ...


class TrainLoop:
    """Trains `step` with `optimizer` on `loader` until `epochs` or `max_steps`, or a hook stops.

    `sampler` is the loader's training sampler: the loop positions it on (epoch, batch) to
    resume exactly (`ResumableSampler`). `scaler`: a GradScaler for fp16 autocast.
    `optimizer_step`: the backward + update (`OptimizerStep`, compiled with
    compiler.optimizer=true); None: an eager one of `optimizer` and `scaler`. Under DDP
    (`world` of several ranks) gradients are averaged over ranks, so the backward uses
    world-size x the loss (each rank's loss is already divided by the global positives);
    logged losses are summed over ranks and step times are the slowest rank's.
    Timing: `data_ms` is the host's wait for the next batch; `step_ms` the device time from
    the step being queued to its optimizer step having run (events; wall clock on the cpu).
    """

    def __init__(
        self,
        step: TrainStep,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: Iterable[Batch],
        sampler: ResumableSampler | None,
        device: Device,
        telemetry: Telemetry,
        hooks: Iterable[Hook] = (),
        scaler: torch.amp.GradScaler | None = None,
        world: World | None = None,
        optimizer_step: OptimizerStep | None = None,
    ) -> None:
        self.step, self.optimizer, self.scheduler = step, optimizer, scheduler
        self.optimizer_step = optimizer_step or OptimizerStep(optimizer, scaler)
        self.loader, self.sampler, self.device = loader, sampler, device
        self.telemetry, self.hooks, self.scaler = telemetry, list(hooks), scaler
        self.world = world or World()

    def run(
        self, epochs: int, max_steps: int | None = None, progress: Progress | None = None
    ) -> Progress:
        """Train from `progress` (a resumed run's position); return where training stopped."""
        progress = progress or Progress()
        failed = True
        for hook in self.hooks:
            hook.before_train(progress)
        try:
            self._epochs(progress, epochs, max_steps)
            failed = False
        finally:
            for hook in self.hooks:
                hook.after_train(progress, failed)
        return progress

    def _epochs(self, progress: Progress, epochs: int, max_steps: int | None) -> None:
        pending: StepRecord | None = None
        while progress.epoch < epochs and (max_steps is None or progress.step < max_steps):
            if self.sampler is not None:
                self.sampler.set_epoch(progress.epoch)
                if progress.batch:
                    self.sampler.skip(progress.batch)
            data_start = perf_counter()
            for batch in self.loader:
                record = self.run_step(batch, progress, (perf_counter() - data_start) * 1000.0)
                if pending is not None:  # read the previous step while this one runs
                    self.finish(pending, progress)
                pending = record
                last = max_steps is not None and progress.step >= max_steps
                if last or any(hook.sync_after(progress) for hook in self.hooks):
                    self.finish(pending, progress)
                    pending = None
                if last or any(hook.should_stop() for hook in self.hooks):
                    if pending is not None:
                        self.finish(pending, progress)
                    return
                data_start = perf_counter()
            if pending is not None:
                self.finish(pending, progress)
                pending = None
            progress.epoch += 1
            progress.batch = 0
            for hook in self.hooks:
                hook.after_epoch(progress)

    def run_step(self, batch: Batch, progress: Progress, data_ms: float = 0.0) -> StepRecord:
        """Queue one optimizer step on `batch` (moved to the device); nothing is read back."""
        batch = batch.to(self.device.torch)
        for hook in self.hooks:
            hook.before_step(progress)
        start = self.device.mark()
        losses = self.step(batch)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        backward = total * self.world.size if self.world.distributed else total
        self.optimizer_step(backward)
        end = self.device.mark()
        # a compiled optimizer's lr is a host tensor the schedule changes in place: copy it
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        progress.step += 1
        progress.batch += 1
        for hook in self.hooks:
            hook.after_update(progress)
        stacked = torch.stack([total.detach(), *(v.detach() for v in losses.values())]).float()
        return StepRecord(
            step=progress.step,
            epoch=progress.epoch,
            batch=batch,
            data_ms=data_ms,
            lr=lr,
            start=start,
            end=end,
            losses=self.device.to_host(all_reduce(stacked)),
            names=["total", *losses],
            graphs=self.step.graphs_last_call,
        )

    def finish(self, record: StepRecord, progress: Progress) -> None:
        """Read a queued step's losses and time, stop on a non-finite loss, log, call hooks."""
        record.values = dict(zip(record.names, record.losses.values(), strict=True))
        record.step_ms = record.end.ms_since(record.start)
        data_ms = record.data_ms
        if self.world.distributed:  # the slowest rank sets the pace
            # host numbers over the host group: a device collective read here would wait for
            # the step queued after this one
            record.step_ms, data_ms = host_all_reduce([record.step_ms, data_ms], op="max")
        if not all(math.isfinite(v) for v in record.values.values()):
            terms = ", ".join(f"{k}={v}" for k, v in record.values.items())
            raise NonFiniteLoss(
                f"training stopped: the loss of step {record.step} (epoch {record.epoch}) is not "
                f"finite ({terms}). Lower the learning rate (optim.lr) or check the data of "
                "this batch."
            )
        batch = record.batch
        self.telemetry.log_step(
            record.step,
            record.step_ms,
            data_ms,
            batch_size=len(batch.image_ids) * self.world.size,
            losses=record.values,
            lr=record.lr,
            boxes_dropped=getattr(batch, "boxes_dropped", 0),
            graphs=self.step.graphs,
            data_counts={k: getattr(batch, k, 0) for k in DATA_COUNTS},
        )
        for hook in self.hooks:
            hook.after_step(record, progress)
