"""The training loop: built objects in (step, optimizer, loader, telemetry), hooks at its seams.

As torchvision's references/detection engine, the loop takes built objects, not the config;
as detectron2's trainer, everything around the step (checkpoints, evaluation, the profiler,
bucket counting, stop signals) is a `Hook` in a list.

The host never waits for the device inside the steady loop: a step's losses and its device
time are copied/timed with marks and read one step late, after the next step has been queued
(`Device.mark`, `Device.to_host`). Under torchrun, what the ranks agree on from host numbers
(the slowest rank's times, the stop vote) goes over a gloo side group
(`distributed.host_all_reduce`), not through the device's queue. Steps a hook must see exactly
(a checkpoint, the end of an epoch, the last step) are read at once instead (a hook's
`after_update` answers "now"). A non-finite loss stops training when it is read, at most one
step later, naming the step it came from. No device tensor outlives its step: what the
telemetry and the hooks read later of a batch (its size, its data counters, its box rows) is
copied into the `StepRecord` as host ints when the step is queued.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Literal

import torch

from ssd_npu.data.batch import Batch, HostCounts
from ssd_npu.data.samplers import ResumableSampler
from ssd_npu.device.backend import Device, HostCopy, Mark
from ssd_npu.device.distributed import World, all_reduce, host_all_reduce
from ssd_npu.engine.optim import OptimizerStep
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.engine.train_step import TrainStep
from ssd_npu.errors import UserError

# How training ended, for `Hook.after_train`: "done" (epochs or max_steps reached),
# "interrupted" (a hook's `after_update` answered "stop", e.g. a stop signal), "failed" (raised).
Outcome = Literal["done", "failed", "interrupted"]
# When the loop reads a queued step, as a hook's `after_update` asks: "late" (after the next
# step is queued), "now" (at once: the model is exactly as after it), "stop" (at once, then end).
Read = Literal["late", "now", "stop"]


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
    """One queued step, until its results are read: what the hooks and telemetry get.

    It holds no tensor of the batch, so the batch's device memory is free once its step ran."""

    step: int  # 1-based optimizer step
    epoch: int
    counts: HostCounts
    data_ms: float  # host wait for this batch
    lr: float
    start: Mark
    end: Mark
    losses: HostCopy  # total, then each term, as queued on the device
    names: list[str]  # the losses' names ("total" first)
    counted: list[str]  # then the step's device counters (TrainStep.device_counts)
    graphs: int  # graphs the step compiled when it was queued (0 when eager)
    step_ms: float = 0.0  # filled when read: device time of the step
    values: dict[str, float] = field(default_factory=dict)  # filled when read


class Hook:
    """A seam of the loop; override what you need (all no-ops here). Called in list order, on
    every rank. A hook is built from explicit objects and holds no other hook: what one needs
    to know of training (how it ended) the loop passes to it.

    before_train(progress)        once, before the first batch (also when resuming)
    after_update(progress) -> Read  a step (forward, loss, backward, optimizer) is queued and
                                  nothing of it read yet (work here is not the step's); asked
                                  of every hook, so a collective in one stays in step. "late":
                                  read it after the next step is queued; "now": read it at once
                                  (the model then is exactly as after it, e.g. to checkpoint
                                  it); "stop": read it at once, then end training
    after_step(record, progress)  a step's results were read and logged (record.step may be
                                  progress.step - 1: the model is then one step further)
    after_epoch(progress) -> Read | None  all of an epoch's steps read; "stop": end training
                                  there (e.g. an evaluation reached its target), like a stop
                                  after a step ("interrupted")
    after_train(progress, outcome)  always, last; outcome: "done", "interrupted" (a hook
                                  answered "stop") or "failed" (training raised, e.g. a
                                  non-finite loss)
    """

    def before_train(self, progress: Progress) -> None: ...

    def after_update(self, progress: Progress) -> Read:
        return "late"

    def after_step(self, record: StepRecord, progress: Progress) -> None: ...

    def after_epoch(self, progress: Progress) -> Read | None:
        return None

    def after_train(self, progress: Progress, outcome: Outcome) -> None: ...


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
        outcome: Outcome = "failed"  # unless the epochs return
        for hook in self.hooks:
            hook.before_train(progress)
        try:
            outcome = self._epochs(progress, epochs, max_steps)
        finally:
            for hook in self.hooks:
                hook.after_train(progress, outcome)
        return progress

    def _epochs(self, progress: Progress, epochs: int, max_steps: int | None) -> Outcome:
        """Epochs until `epochs` or `max_steps` ("done") or a hook's "stop" ("interrupted")."""
        while progress.epoch < epochs and (max_steps is None or progress.step < max_steps):
            if self.sampler is not None:
                self.sampler.set_epoch(progress.epoch)
                if progress.batch:
                    self.sampler.skip(progress.batch)
            ended = self._epoch(progress, max_steps)
            if ended is not None:
                return ended
            progress.epoch += 1
            progress.batch = 0
            # every hook is asked (a collective in one stays in step across ranks)
            if "stop" in [hook.after_epoch(progress) for hook in self.hooks]:
                return "interrupted"
        return "done"

    def _epoch(self, progress: Progress, max_steps: int | None) -> Outcome | None:
        """One epoch's steps, each read one step late, or at once where a hook or the last step
        asks. None: the loader ran out; else how training ended inside the epoch.

        If the loader, a step or a hook raises, the step queued before is read (logged) first,
        so that no step that ran goes unlogged: not under torchrun, where reading it joins a
        collective the other ranks may never reach, and not on a KeyboardInterrupt (a second
        Ctrl-C: do not wait for the device)."""
        pending: StepRecord | None = None
        batches = _timed(self.loader)
        while True:
            try:
                queued = self._queue_next(batches, progress)
            except Exception:
                if pending is not None and not self.world.distributed:
                    self.finish(pending, progress)
                raise
            if queued is None:
                break
            record, reads = queued
            if pending is not None:  # read the previous step while this one runs
                self.finish(pending, progress)
            pending = record
            last = max_steps is not None and progress.step >= max_steps
            if last or reads & {"now", "stop"}:
                pending = None
                self.finish(record, progress)
            if "stop" in reads:  # also on the last step: the stop was asked, say so
                return "interrupted"
            if last:
                return "done"
        if pending is not None:
            self.finish(pending, progress)
        return None

    def _queue_next(
        self, batches: Iterator[tuple[Batch, float]], progress: Progress
    ) -> tuple[StepRecord, set[Read]] | None:
        """Queue the next batch's step and ask every hook when to read it (all of them: a
        collective inside one stays in step). None: the loader ran out."""
        item = next(batches, None)
        if item is None:
            return None
        batch, data_ms = item
        record = self.run_step(batch, progress, data_ms)
        return record, {hook.after_update(progress) for hook in self.hooks}

    def run_step(self, batch: Batch, progress: Progress, data_ms: float = 0.0) -> StepRecord:
        """Queue one optimizer step on `batch` (moved to the device); nothing is read back.

        The record keeps the batch's host counters, not the batch: its device tensors are free
        once the step ran."""
        counts = batch.host_counts()  # host ints: before the move, no device read
        batch = batch.to(self.device.torch)
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
        counted = self.step.device_counts()  # read with the losses, one step late
        stacked = torch.stack(
            [total.detach(), *(v.detach() for v in losses.values()), *counted.values()]
        ).float()
        return StepRecord(
            step=progress.step,
            epoch=progress.epoch,
            counts=counts,
            data_ms=data_ms,
            lr=lr,
            start=start,
            end=end,
            losses=self.device.to_host(all_reduce(stacked)),
            names=["total", *losses],
            counted=list(counted),
            graphs=self.step.graphs_last_call,
        )

    def finish(self, record: StepRecord, progress: Progress) -> None:
        """Read a queued step's losses and time, stop on a non-finite loss, log, call hooks."""
        read = record.losses.values()
        record.values = dict(zip(record.names, read[: len(record.names)], strict=True))
        device_counts = {
            k: int(v) for k, v in zip(record.counted, read[len(record.names) :], strict=True)
        }
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
        counts = record.counts
        self.telemetry.log_step(
            record.step,
            record.step_ms,
            data_ms,
            batch_size=counts.images * self.world.size,
            losses=record.values,
            lr=record.lr,
            boxes_dropped=counts.boxes_dropped,
            graphs=self.step.graphs,
            data_counts=counts.data | device_counts,
        )
        for hook in self.hooks:
            hook.after_step(record, progress)


def _timed(loader: Iterable[Batch]) -> Iterator[tuple[Batch, float]]:
    """`loader`'s batches, each with the host's wait for it in ms (the first also includes
    starting the loader's iterator: its workers)."""
    start = perf_counter()
    for batch in loader:
        yield batch, (perf_counter() - start) * 1000.0
        start = perf_counter()  # resumed: the loop asks for the next batch
