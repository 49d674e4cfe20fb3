"""The loop's hooks: checkpoints, evaluation, the profiler, bucket counting, stop signals.

Each is a `ssd_npu.engine.loop.Hook` built from explicit objects; `ssd_npu.train.run` puts them in
a list. No hook holds another: how training ended reaches each as `after_train`'s outcome.
Only rank 0 writes (checkpoints, TensorBoard), but every rank runs every hook, so collectives
(evaluation's gather, the stop vote) stay in step across ranks.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
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
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.evaluation.background import BackgroundCoco, BackgroundEvalError
from ssd_npu.evaluation.detections import DetectionSheet
from ssd_npu.evaluation.evaluate import Evaluator

DETECTIONS_TAG = "eval/detections"  # TensorBoard image tag (a public contract, README)


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
    """A checkpoint every `every` steps (0: none on the way) and one when training ends "done"
    or "interrupted" (after a failure the last one written is the last good one)."""

    def __init__(self, state: TrainState, folder: Path, every: int, keep: int, main: bool):
        self.state, self.folder, self.every, self.keep, self.main = state, folder, every, keep, main
        self.saved: list[Path] = []

    def _due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def after_update(self, progress: Progress) -> Read:
        # the checkpoint must hold the weights of that step: read it before the next is queued
        return "now" if self._due(progress.step) else "late"

    def after_step(self, record: StepRecord, progress: Progress) -> None:
        if self._due(record.step):
            self.save(progress)

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
        if outcome != "failed" and (
            not self.saved or self.saved[-1] != checkpoint_path(self.folder, progress.step)
        ):
            self.save(progress)

    @property
    def last(self) -> Path | None:
        return self.saved[-1] if self.saved else None


@dataclass(frozen=True)
class Target:
    """`eval.target_map`: stop training at the first evaluation whose `metric` ("mAP" or
    "mAP50") is >= `value`, MLPerf-style (the checkpoint hook then writes that step);
    `stop=False` (eval.target_stop=false) only records where it was reached."""

    value: float
    metric: str = "mAP"
    stop: bool = True


# the times of an evaluation (seconds), in every history entry; see EvalHook
TIME_KEYS = ("forward_s", "records_s", "cocoeval_s", "stall_s", "await_s", "wall_s")


class EvalHook(Hook):
    """COCO mAP every `every_epochs` epochs (0: none on the way) and when training ends "done"
    (`final`; not when it failed or was interrupted); logged as eval/mAP(50) at the step the
    weights are from. With a `sheet`, each evaluation also logs its picture as the image
    `eval/detections`.

    Each `history` entry: step, mAP, mAP50, num_images, num_detections and the times in
    seconds: forward_s (the pass over the val set), records_s (the results array), cocoeval_s,
    stall_s (how long training waited for the evaluation; TensorBoard `time/eval_stall_s`),
    await_s (waited for its result after training ended; 0 when synchronous) and wall_s (from
    the start of training to the result being known).

    `background` (`eval.background=true`, rank 0): the evaluation gathers the detections and
    hands them to the side process; results are logged with their own step when they arrive
    (looked for after every step), and the last ones are awaited in `after_train`, whatever the
    outcome. The entries other than the times are the same as a synchronous run's.
    `target`: stop at the evaluation that reaches it (synchronous: at the end of that epoch;
    background: at the step during which the result arrives). Every rank stops at the same
    step: rank 0's finding is voted over the host group.
    """

    def __init__(
        self,
        evaluator: Evaluator,
        telemetry: Telemetry,
        every_epochs: int,
        epochs: int,
        final: bool = True,
        sheet: DetectionSheet | None = None,
        background: BackgroundCoco | None = None,
        target: Target | None = None,
    ) -> None:
        self.evaluator, self.telemetry, self.sheet = evaluator, telemetry, sheet
        self.every, self.epochs, self.final = every_epochs, epochs, final
        self.background, self.target = background, target
        self.history: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None  # the history entry that reached the target
        self.start = time.perf_counter()
        self.earlier_s = 0.0  # training seconds before a resume: wall_s counts the whole run

    def state_dict(self) -> dict[str, Any]:
        """The evaluations recorded so far (a checkpoint keeps them: a resumed run's summary
        holds every one), where the target was reached, and the training time so far. A
        background evaluation still in the side process is not in it."""
        reached = self.history.index(self.reached) if self.reached is not None else None
        elapsed = self.earlier_s + time.perf_counter() - self.start
        return {"history": list(self.history), "reached": reached, "elapsed_s": elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        index = state["reached"]
        self.reached = self.history[index] if index is not None else None
        self.earlier_s = float(state["elapsed_s"])

    @property
    def stops(self) -> bool:
        """Whether reaching the target stops training."""
        return self.target is not None and self.target.stop

    def before_train(self, progress: Progress) -> None:
        self.start = time.perf_counter()

    def after_update(self, progress: Progress) -> Read:
        if self.background is not None:
            self._record_all(self.background.arrived())
        if not self.stops or self.background is None:
            return "late"  # a synchronous run stops at the end of the evaluated epoch
        return "stop" if distributed.any_rank(self.reached is not None) else "late"

    def after_epoch(self, progress: Progress) -> Read | None:
        if self.every and progress.epoch % self.every == 0 and progress.epoch < self.epochs:
            self.evaluate(progress.step)
            if self.stops and self.background is None:
                return "stop" if distributed.any_rank(self.reached is not None) else None
        return None

    def after_train(self, progress: Progress, outcome: Outcome) -> None:
        try:
            if self.final and outcome == "done" and not (self.stops and self.reached):
                self.evaluate(progress.step)
        finally:
            self.finish(raise_errors=outcome != "failed")

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Evaluate the weights of `step`. Synchronous: the result (None on ranks > 0).
        Background: None; the result comes to `history` when it arrives."""
        start = time.perf_counter()
        result, pending = None, None
        if self.background is None:
            result = self.evaluator.run()
        else:
            gathered = self.evaluator.gather()
            if gathered is not None:  # rank 0: handed over before the picture, to start sooner
                times = {"forward_s": gathered.forward_s, "records_s": gathered.records_s}
                pending = self.background.submit(step, gathered.results, gathered.image_ids, times)
        if self.sheet is not None and self.telemetry.writer is not None:  # rank 0 only
            self.telemetry.log_image(DETECTIONS_TAG, self.sheet.render(), step)
        stall_s = time.perf_counter() - start
        self.telemetry.log_scalars(step, {"time/eval_stall_s": stall_s})
        if result is not None:  # rank 0 only
            self._record(step, {**result, "stall_s": stall_s, "await_s": 0.0})
        if pending is not None:  # its result is recorded when it arrives
            pending.times["stall_s"] = stall_s
        return result

    def _record(self, step: int, result: dict[str, Any]) -> None:
        keys = ("mAP", "mAP50", "num_images", "num_detections", *TIME_KEYS[:-1])
        entry = {"step": step, **{k: result[k] for k in keys}}
        entry["wall_s"] = self.earlier_s + time.perf_counter() - self.start
        self.history.append(entry)
        self.telemetry.log_scalars(step, {"eval/mAP": result["mAP"], "eval/mAP50": result["mAP50"]})
        target = self.target
        if target is not None and self.reached is None and result[target.metric] >= target.value:
            self.reached = entry

    def _record_all(self, results: list[tuple[int, dict[str, Any]]]) -> None:
        for step, result in results:
            self._record(step, {"await_s": 0.0, **result})

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for the evaluations still in the side process, log them, stop the process.
        raise_errors=False (training already failed): a failed evaluation is only reported."""
        if self.background is None:
            return
        try:
            while self.background.pending:
                self._record_all([self.background.wait_next()])
        except BackgroundEvalError as err:
            if raise_errors:
                raise
            print(f"ssd-npu: {err}", file=sys.stderr)
        finally:
            self.background.close()

    def target_summary(self, stopped_step: int) -> dict[str, Any] | None:
        """summary.json's `eval.target`: the target, whether and where it was reached (the
        evaluated step, seconds from the start of training to its result) and the step training
        stopped at (background: later than the evaluated one)."""
        if self.target is None:
            return None
        reached = self.reached
        return {
            "metric": self.target.metric,
            "value": self.target.value,
            "stop": self.target.stop,
            "reached": reached is not None,
            "step": reached["step"] if reached else None,
            "wall_s": reached["wall_s"] if reached else None,
            "stopped_step": stopped_step,
        }


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
