"""Step timing, warm-up detection, TensorBoard scalars and images, progress bar, summary.json.

Tags and summary keys are public contracts (README, "What a run writes"): keep their names.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from time import perf_counter
from typing import Any

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ssd_npu.errors import UserError

# A step counts as warm-up when it is slower than this many times the steady reference.
WARMUP_FACTOR = 2.0
# Normal steps allowed between two warm-up steps (compile, normal step, compile of a new shape).
WARMUP_MAX_GAP = 1


def detect_warmup(
    step_ms: list[float], factor: float = WARMUP_FACTOR, max_gap: int = WARMUP_MAX_GAP
) -> int:
    """Number of leading warm-up (compile) steps in a step-time series (ms).

    Rule: the reference is the median of the second half of the run (compiles are over
    by then). A step in the first half slower than `factor` x reference is slow. Warm-up is
    the leading chain of slow steps, each at most `max_gap` normal steps after the previous
    one: a compile, a normal step and a second compile (a new shape) are all warm-up, while
    a spike after a run of normal steps (a hiccup on a shared host, a late recompile) is not.
    A one-step run is all warm-up; a run with no slow first step(s) has none.
    """
    n = len(step_ms)
    if n <= 1:
        return n
    reference = statistics.median(step_ms[n // 2 :])
    warmup = 0
    for i in range(n - n // 2):
        if step_ms[i] > factor * reference:
            if i - warmup > max_gap:
                break
            warmup = i + 1
    return warmup


def steady_median(step_ms: list[float], warmup: int) -> float | None:
    """Median step time after warm-up (ms); the whole run's median if all is warm-up."""
    steady = step_ms[warmup:] or step_ms
    return statistics.median(steady) if steady else None


def read_scalar_series(run_dir: Path, required: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag a run wrote, as {tag: (steps, values)} sorted by step.

    `run_dir`: a train.py output folder (its `tensorboard/`, as Telemetry writes it) or a
    TensorBoard folder itself. Raises UserError naming the folder when `required` is missing.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tensorboard" if (run_dir / "tensorboard").is_dir() else run_dir
    if not tb.is_dir():
        raise UserError(f"{run_dir} is not a folder; give a train.py output folder.")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if required not in tags:
        raise UserError(f"{tb} has no {required!r} scalars; give a train.py output folder.")
    series = {}
    for tag in tags:
        events = sorted(acc.Scalars(tag), key=lambda e: e.step)
        series[tag] = ([e.step for e in events], [e.value for e in events])
    return series


class Telemetry:
    """Collects per-step numbers; rank 0 (`enabled`) writes TensorBoard and summary.json."""

    def __init__(self, out_dir: str | Path, total_steps: int, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.step_ms: list[float] = []
        self.data_ms: list[float] = []
        self.wall_s: list[float] = []  # host clock (perf_counter, s) when each step was logged
        self.batch_sizes: list[int] = []
        self.boxes_dropped = 0
        self.data_counts: dict[str, int] = {}  # degenerate / clipped boxes, skipped images, ...
        self.last_losses: dict[str, float] = {}
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard")) if enabled else None
        # no bar at all when nothing will be trained (eval_only, a finished run)
        disable = not enabled or total_steps <= 0
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, disable=disable)

    def log_step(
        self,
        step: int,
        step_ms: float,
        data_ms: float,
        batch_size: int,
        losses: dict[str, float],
        lr: float,
        boxes_dropped: int,
        graphs: int | None = None,
        data_counts: dict[str, int] | None = None,
    ) -> None:
        """One optimizer step. Times in ms; `losses` has total, bbox_regression, classification."""
        self.step_ms.append(step_ms)
        self.data_ms.append(data_ms)
        self.wall_s.append(perf_counter())
        self.batch_sizes.append(batch_size)
        self.boxes_dropped += boxes_dropped
        for key, value in (data_counts or {}).items():
            self.data_counts[key] = self.data_counts.get(key, 0) + int(value)
        self.last_losses = dict(losses)
        if self.writer is not None:
            scalars = {
                "time/step_ms": step_ms,
                "time/data_ms": data_ms,
                "throughput/images_per_s": batch_size * 1000.0 / step_ms,
                "lr": lr,
                "data/boxes_dropped": boxes_dropped,
                **{f"loss/{k}": v for k, v in losses.items()},
            }
            if graphs is not None:
                scalars["compile/graphs"] = graphs
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        self.bar.set_postfix(loss=f"{losses['total']:.3f}", step_ms=f"{step_ms:.0f}")
        self.bar.update(1)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        """A picture, uint8 [3, H, W] RGB, under `tag` at `step` (rank 0 only)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def summary(self, **fields: Any) -> dict[str, Any]:
        """The summary.json fields from the timings, plus `fields` (device, shape, ...)."""
        warmup = detect_warmup(self.step_ms)
        steady = steady_median(self.step_ms, warmup)
        batch = statistics.median(self.batch_sizes) if self.batch_sizes else 0
        return {
            "steps": len(self.step_ms),
            "warmup_steps": warmup,
            "steady_step_ms": steady,
            "steady_images_per_s": batch * 1000.0 / steady if steady else None,
            "first_step_ms": self.step_ms[0] if self.step_ms else None,
            "steady_data_ms": steady_median(self.data_ms, warmup),
            **self._wall_clock(warmup, batch),
            "boxes_dropped": self.boxes_dropped,
            "data_counts": dict(self.data_counts),
            "final_loss": self.last_losses.get("total"),
            **fields,
        }

    def _wall_clock(self, warmup: int, batch: float) -> dict[str, float | None]:
        """Steady throughput by the host's clock, and the share of it spent waiting for data.

        Steps are logged as their results are read, at the pace the device finishes them, so
        the time from the first steady log to the last, over the steps between, is the steady
        wall-clock step: data waits, host work and launch gaps included, which device time
        (`steady_step_ms`) leaves out. Means, not medians: a wait that recurs (a new epoch's
        first batch) is part of the throughput. `data_wait_pct` = steady data wait / that time.
        """
        start = max(warmup, 1)  # an interval needs the step before it
        steps = len(self.wall_s) - start
        if steps <= 0:
            return {"steady_wall_step_ms": None, "steady_wall_images_per_s": None,
                    "data_wait_pct": None}  # fmt: skip
        wall_ms = 1000.0 * (self.wall_s[-1] - self.wall_s[start - 1]) / steps
        return {
            "steady_wall_step_ms": wall_ms,
            "steady_wall_images_per_s": batch * 1000.0 / wall_ms if wall_ms > 0 else None,
            "data_wait_pct": 100.0 * statistics.fmean(self.data_ms[start:]) / wall_ms
            if wall_ms > 0
            else None,
        }

    def write_summary(self, summary: dict[str, Any]) -> Path | None:
        """Write summary.json atomically (temp file, fsync, rename); rank 0 only."""
        if not self.enabled:
            return None
        path = self.out_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
