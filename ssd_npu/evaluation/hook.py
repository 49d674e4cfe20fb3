"""Evaluation's hook: COCO mAP during and after training, its picture, and the mAP target.

`EvalHook` is one of the loop's hooks (`ssd_npu.engine.loop.Hook`); `ssd_npu.train.run`
builds it from an `Evaluator` and puts it in the list with the others.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from ssd_npu.device import distributed
from ssd_npu.engine.loop import Hook, Outcome, Progress, Read
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.evaluation.background import BackgroundCoco, BackgroundEvalError
from ssd_npu.evaluation.detections import DetectionSheet
from ssd_npu.evaluation.evaluate import Evaluator

DETECTIONS_TAG = "eval/detections"  # TensorBoard image tag (a public contract, README)


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
