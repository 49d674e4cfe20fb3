"""The hooks every run has: checkpoints, the profiler, bucket counting, stop signals.

Each is a `ssd_npu.engine.loop.Hook` built from explicit objects; `ssd_npu.train.run` puts
them in a list with evaluation's hook (`ssd_npu.evaluation.hook.EvalHook`). No hook holds
another: how training ended reaches each as `after_train`'s outcome.
Only rank 0 writes (checkpoints, TensorBoard), but every rank runs every hook, so collectives
(evaluation's gather, the stop vote) stay in step across ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ssd_npu.device import distributed
from ssd_npu.device.backend import Device
from ssd_npu.engine.checkpoint import (
    TrainState,
    checkpoint_path,
    gather_rng_states,
    save_checkpoint,
)
from ssd_npu.engine.interrupt import StopOnSignal
from ssd_npu.engine.loop import Hook, NonFiniteLoss, Outcome, Progress, Read, StepRecord


class StopSignalHook(Hook):
    """SIGINT / SIGTERM stop training after the current step; every rank stops at the same one
    (training then ends "interrupted").

    The ranks vote once per queued step over the host (gloo) group: the flag is a host bool,
    so the vote never waits for the device, and the step it stops after is the one just queued.
    """

    def __init__(self) -> None:
        self.signal = StopOnSignal()

    @property
    def requested(self) -> bool:
        return self.signal.requested()

    def before_train(self, progress: Progress) -> None:
        self.signal.__enter__()

    def after_update(self, progress: Progress) -> Read:
        # Every rank must stop after the same step, or one would wait forever in a collective.
        return "stop" if distributed.any_rank(self.signal.requested()) else "late"

    def after_train(self, progress: Progress, outcome: Outcome) -> None:
        self.signal.__exit__(None, None, None)


class CheckpointHook(Hook):
    """A checkpoint every `every` steps (0: none on the way), one after the run's `last_step`,
    and one when training ends "interrupted" (after a failure the last one written is the last
    good one).

    A checkpoint is written as soon as its step is read, so nothing a later hook does (an
    evaluation that fails or is killed) can lose that training; the last step's too, before
    `after_train` and its final evaluation. A checkpoint of an epoch's last step is written
    again at `after_epoch`, after the hooks before this one in the list: an evaluation of that
    epoch is then in it, and a run resumed from it keeps that evaluation.
    """

    def __init__(
        self,
        state: TrainState,
        folder: Path,
        every: int,
        keep: int,
        main: bool,
        last_step: int = 0,
    ):
        self.state, self.folder, self.every, self.keep, self.main = state, folder, every, keep, main
        self.last_step = last_step  # 0: unknown (then the end's checkpoint is after_train's)
        self.saved: list[Path] = []

    def _due(self, step: int) -> bool:
        return (bool(self.every) and step % self.every == 0) or step == self.last_step

    def _saved_at(self, step: int) -> bool:
        return bool(self.saved) and self.saved[-1] == checkpoint_path(self.folder, step)

    def after_update(self, progress: Progress) -> Read:
        # the checkpoint must hold the weights of that step: read it before the next is queued
        return "now" if self._due(progress.step) else "late"

    def after_step(self, record: StepRecord, progress: Progress) -> None:
        if self._due(record.step):
            self.save(progress)

    def after_epoch(self, progress: Progress) -> Read | None:
        # the weights are still those of the saved step; the hooks before this one (an
        # evaluation) changed their state since. The last epoch evaluates in after_train only.
        if self._saved_at(progress.step) and progress.step != self.last_step:
            self.save(progress)
        return None

    def save(self, progress: Progress) -> None:
        # A finite loss at step s was computed before s's update: the update itself can still
        # blow the weights up. Never write such weights over the last good checkpoint.
        params = [p.detach() for p in self.state.model.parameters()]
        if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            raise NonFiniteLoss(
                f"training stopped: the weights after step {progress.step} are not finite (the "
                "update diverged). Lower the learning rate (optim.lr) or check the data."
            )
        # a collective: every rank sends its RNG states (its device's generator's too) to rank 0
        rng = gather_rng_states(self.state.device)
        if self.main:
            state = self.state.to_dict(progress, rng)
            self.saved.append(save_checkpoint(state, self.folder, progress.step, self.keep))
        else:
            self.saved.append(checkpoint_path(self.folder, progress.step))

    def after_train(self, progress: Progress, outcome: Outcome) -> None:
        # after a failure (a non-finite loss) the last checkpoint written is the last good one
        if outcome != "failed" and not self._saved_at(progress.step):
            self.save(progress)

    @property
    def last(self) -> Path | None:
        return self.saved[-1] if self.saved else None


class ProfilerHook(Hook):
    """A profiler trace of `steps` steps (after 1 wait + 1 warm-up step) into `out_dir`."""

    def __init__(self, device: Device, out_dir: Path, steps: int) -> None:
        self.profiler = device.profiler(str(out_dir), steps)
        self.context = contextlib.ExitStack()

    def before_train(self, progress: Progress) -> None:
        self.context.enter_context(self.profiler)

    def after_update(self, progress: Progress) -> Read:
        self.profiler.step()
        return "late"

    def after_train(self, progress: Progress, outcome: Outcome) -> None:
        self.context.close()


class BucketCountHook(Hook):
    """Batches and graphs compiled per box-count bucket (boxes [B, M, 4]: M), for summary.json."""

    def __init__(self, sizes: tuple[int, ...], count_graphs: bool) -> None:
        self.sizes, self.count_graphs = sizes, count_graphs
        self.batches = {m: 0 for m in sizes}
        self.graphs = {m: 0 for m in sizes}

    def after_step(self, record: StepRecord, progress: Progress) -> None:
        m = record.counts.box_rows
        if m is None:  # a DynamicBatch: no box-count bucket
            return
        self.batches[m] = self.batches.get(m, 0) + 1
        self.graphs[m] = self.graphs.get(m, 0) + record.graphs

    def state_dict(self) -> dict[str, Any]:
        """The counts so far (a checkpoint keeps them: a resumed run counts the whole run)."""
        return {"batches": dict(self.batches), "graphs": dict(self.graphs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = {int(m): int(n) for m, n in state["batches"].items()}
        self.graphs = {int(m): int(n) for m, n in state["graphs"].items()}

    def summary(self) -> dict[str, Any]:
        """summary.json's `buckets`: sizes, batches per bucket, graphs per bucket (or None)."""
        return {
            "sizes": list(self.sizes),
            "batches": {str(m): n for m, n in self.batches.items()},
            "graphs": {str(m): n for m, n in self.graphs.items()} if self.count_graphs else None,
        }
