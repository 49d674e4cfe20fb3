"""`eval.background=true`: COCOeval in a side process while training goes on.

The loop gathers the detections (the only part of an evaluation that needs the weights:
`Evaluator.gather`) and hands the results array [N, 7] and the image ids to `BackgroundCoco`,
which runs COCOeval in one spawned side process (a `ProcessPoolExecutor` with one worker:
evaluations are scored one at a time, in the order they were handed over). The worker reads
the val annotations once, from their json, when it starts (which is when this object is made,
so the first evaluation does not wait for it).

The loop asks for what has arrived (`arrived`: finished evaluations at the head of the queue,
in step order, so the history is the same as a synchronous run's) and waits for the rest at the
end (`wait_next`, one at a time, so a failure loses none of the older ones). A failure in the side process (an exception, or the process dying) surfaces in
the loop's process as one `BackgroundEvalError` naming the step.

Only rank 0 makes one: the other ranks hand their detections to rank 0 in the gather and train
on; nobody waits for COCOeval.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssd_npu.evaluation.cocoeval import GroundTruth, coco_map

# The worker process's ground truth, loaded once by `_start` (one per process).
_GT: GroundTruth | None = None


def _start(ann_file: str, engine: str) -> None:
    """The worker's initializer: read the annotations and index them for the engine."""
    global _GT
    _GT = GroundTruth.of_file(ann_file)
    _GT.index(engine)


def _ready() -> None:
    """Nothing: submitted once at start so that the worker spawns and loads the annotations
    while training begins."""


def _score(results: np.ndarray, image_ids: list[int], engine: str) -> dict[str, Any]:
    """In the worker: `coco_map` of the results, and its time (cocoeval_s, seconds)."""
    assert _GT is not None, "the worker's initializer did not run"
    start = time.perf_counter()
    scored = coco_map(_GT, results, image_ids, engine)
    return {**scored, "cocoeval_s": time.perf_counter() - start}


class BackgroundEvalError(RuntimeError):
    """COCOeval failed in the side process (or the process died); names the step."""


@dataclass
class Pending:
    """An evaluation handed to the side process: its step, the loop's stall handing it over
    (forward + records + hand-off, seconds) and the phase times measured in the loop."""

    step: int
    future: Future
    times: dict[str, float]


class BackgroundCoco:
    """One side process scoring evaluations in order; see the module docstring.

    ann_file: the val annotations json (`CocoDetectionDataset.ann_file`); engine: `eval.coco`.
    """

    def __init__(self, ann_file: Path, engine: str) -> None:
        self.engine = engine
        # spawn, not fork: the loop's process holds threads (loader workers' feeders, the
        # device runtime) that a forked child would inherit in an undefined state
        self.pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(str(ann_file), engine),
        )
        self.started = self.pool.submit(_ready)
        self.pending: deque[Pending] = deque()

    def submit(
        self, step: int, results: np.ndarray, image_ids: list[int], times: dict[str, float]
    ) -> Pending:
        """Hand over one evaluation: results [N, 7] (`ssd_npu.evaluation.records`), the
        evaluated image ids, and the loop's times for it (forward_s, records_s; the caller adds stall_s to
        the returned `Pending.times` once it knows it). Returned in the result with them."""
        future = self.pool.submit(_score, results, image_ids, self.engine)
        self.pending.append(Pending(step, future, times))
        return self.pending[-1]

    def _take(self, timeout: float | None) -> tuple[int, dict[str, Any]]:
        head = self.pending[0]
        try:
            result = head.future.result(timeout)
        except Exception as err:
            self.pending.popleft()
            raise BackgroundEvalError(
                f"the background evaluation of step {head.step} failed in its side process "
                f"({type(err).__name__}: {err}); rerun with eval.background=false to see it "
                "in the training process."
            ) from err
        self.pending.popleft()
        return head.step, {**result, **head.times}

    def arrived(self) -> list[tuple[int, dict[str, Any]]]:
        """(step, result) of the finished evaluations at the head of the queue, oldest first;
        does not wait. A later evaluation that finished first waits for the older ones."""
        out = []
        while self.pending and self.pending[0].future.done():
            out.append(self._take(None))
        return out

    def wait_next(self) -> tuple[int, dict[str, Any]]:
        """The oldest remaining (step, result), waiting for it; the result gets `await_s`: how
        long the wait took (seconds). Call while `pending` is not empty."""
        start = time.perf_counter()
        step, result = self._take(None)
        return step, {**result, "await_s": time.perf_counter() - start}

    def close(self) -> None:
        """Stop the side process; evaluations not yet started are dropped."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
