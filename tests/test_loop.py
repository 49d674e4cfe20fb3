"""The loop never waits for the device inside the steady loop, and a non-finite loss stops it.

A device seam (`RecordingDevice`) logs the order of step launches and host reads: the loop
must queue step k+1 before it reads step k's losses, except for steps a hook asks to read at
once (a checkpoint). A NaN in step k stops training with a message naming step k, at most one
step later, and the last checkpoint written is a good one. The hook protocol stays narrow: a
few seams, a record that keeps no batch tensor, and the outcome handed to `after_train`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ssd_npu.data.batch import DATA_COUNTS
from ssd_npu.data.coco import CocoDetectionDataset
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.device.backend import CPU, Device, HostCopy
from ssd_npu.engine.checkpoint import TrainState, list_checkpoints
from ssd_npu.engine.hooks import BucketCountHook, CheckpointHook
from ssd_npu.engine.loop import (
    Hook,
    NonFiniteLoss,
    Outcome,
    Progress,
    Read,
    StepRecord,
    TrainLoop,
)
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.engine.train_step import TrainStep
from ssd_npu.evaluation.evaluate import Evaluator, Found
from ssd_npu.evaluation.hook import EvalHook
from ssd_npu.evaluation.records import empty_results

EVENTS: list[tuple[str, int]] = []


class _LoggedCopy(HostCopy):
    def __init__(self, tensor: torch.Tensor, step: int) -> None:
        super().__init__(tensor, CPU)
        self.step = step

    def values(self) -> list[float]:
        EVENTS.append(("read", self.step))
        return super().values()


class RecordingDevice(Device):
    """The cpu, logging every host read of a step's results (the thinnest seam)."""

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        return _LoggedCopy(tensor, launched())


def launched() -> int:
    return sum(1 for kind, _ in EVENTS if kind == "launch")


class ToyStep(TrainStep):
    """A linear model's squared output; NaN from step `nan_at` on (1-based); step `raise_at`
    raises `error` before it is launched."""

    def __init__(
        self,
        model: nn.Module,
        nan_at: int | None = None,
        raise_at: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.model, self.nan_at, self.raise_at, self.error = model, nan_at, raise_at, error

    def __call__(self, batch: FixedBatch) -> dict[str, torch.Tensor]:
        if self.raise_at is not None and launched() + 1 == self.raise_at:
            raise self.error or RuntimeError(f"step {self.raise_at} failed")
        EVENTS.append(("launch", launched() + 1))
        loss = self.model(batch.images.flatten(1)).pow(2).mean()
        if self.nan_at is not None and launched() >= self.nan_at:
            loss = loss * float("nan")
        return {"toy": loss}


def batches(n: int) -> list[FixedBatch]:
    def one(i: int) -> FixedBatch:
        g = torch.Generator().manual_seed(i)
        return FixedBatch(
            images=torch.rand(2, 3, 4, 4, generator=g),
            boxes=torch.zeros(2, 1, 4),
            labels=torch.zeros(2, 1, dtype=torch.int64),
            valid=torch.zeros(2, 1, dtype=torch.bool),
            image_ids=torch.tensor([2 * i, 2 * i + 1]),
            orig_sizes=torch.full((2, 2), 4),
            content_sizes=torch.full((2, 2), 4),
            scales=torch.ones(2, 2),
            # distinct host counters per batch, so a record can be matched to its batch
            boxes_dropped=i,
            degenerate=10 + i,
            clipped=20 + i,
            downscaled=30 + i,
            skipped=40 + i,
        )

    return [one(i) for i in range(n)]


def make_loop(tmp_path, nan_at=None, hooks=(), raise_at=None, error=None, loader=None):
    EVENTS.clear()
    torch.manual_seed(0)
    model = nn.Linear(48, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    telemetry = Telemetry(tmp_path, 0, enabled=False)
    device = RecordingDevice("cpu", None)
    step = ToyStep(model, nan_at, raise_at, error)
    loader = batches(6) if loader is None else loader
    loop = TrainLoop(step, optimizer, scheduler, loader, None, device, telemetry, hooks)
    return loop, model, optimizer, scheduler, telemetry


def test_step_k_plus_1_is_launched_before_step_k_is_read(tmp_path):
    loop, *_, telemetry = make_loop(tmp_path)
    loop.run(epochs=1)
    assert [k for kind, k in EVENTS if kind == "launch"] == [1, 2, 3, 4, 5, 6]
    assert sorted(k for kind, k in EVENTS if kind == "read") == [1, 2, 3, 4, 5, 6]
    for k in range(1, 6):  # every step but the last (read at the end of the epoch)
        assert EVENTS.index(("launch", k + 1)) < EVENTS.index(("read", k)), EVENTS
    assert len(telemetry.step_ms) == 6 and all(ms > 0 for ms in telemetry.step_ms)


def test_a_checkpoint_step_is_read_at_once(tmp_path):
    loop, model, optimizer, scheduler, _ = make_loop(tmp_path)
    state = TrainState(model, optimizer, scheduler, None, {}, CPU)
    loop.hooks.append(CheckpointHook(state, tmp_path / "ckpt", every=3, keep=5, main=True))
    loop.run(epochs=1)
    # step 3 is saved with exactly its own weights: read before step 4 is launched
    assert EVENTS.index(("read", 3)) < EVENTS.index(("launch", 4))
    assert EVENTS.index(("launch", 3)) < EVENTS.index(("read", 2))  # others stay one late
    saved = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert saved == ["step_0000003.pt", "step_0000006.pt"]


class FailsAtEpochEnd(Hook):
    """An evaluation that fails at the end of the first epoch."""

    def after_epoch(self, progress: Progress) -> Read | None:
        raise RuntimeError("evaluation failed")


def test_an_epoch_end_checkpoint_survives_a_hook_that_fails_after_it(tmp_path):
    """The checkpoint of an epoch's last step is written when the step is read, before the
    hooks' after_epoch (an evaluation) can fail: that training is kept."""
    failing = FailsAtEpochEnd()
    loop, model, optimizer, scheduler, _ = make_loop(tmp_path, hooks=[failing])
    state = TrainState(model, optimizer, scheduler, None, {}, CPU)
    loop.hooks.append(CheckpointHook(state, tmp_path / "ckpt", every=6, keep=5, main=True))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.run(epochs=2)
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_0000006.pt"]


def test_nan_at_step_k_stops_naming_step_k_and_keeps_the_last_good_checkpoint(tmp_path):
    loop, model, optimizer, scheduler, telemetry = make_loop(tmp_path, nan_at=4)
    state = TrainState(model, optimizer, scheduler, None, {}, CPU)
    loop.hooks.append(CheckpointHook(state, tmp_path / "ckpt", every=2, keep=5, main=True))
    with pytest.raises(NonFiniteLoss, match=r"the loss of step 4 \(epoch 0\) is not finite"):
        loop.run(epochs=1)
    assert launched() <= 5  # at most one step after the bad one
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_0000002.pt"]
    assert len(telemetry.step_ms) == 3  # steps 1-3 logged, the bad one not


def test_nan_in_a_real_run_names_the_step(tiny_cfg, tmp_path):
    """Through train.run: the error names a step, summary.json records it, no NaN checkpoint."""
    import json

    from ssd_npu.train import run

    cfg = tiny_cfg(
        "canvas=[128,128]", "max_boxes=8", "eval=false", "optim.lr=1e12", "optim.warmup_steps=0",
        "max_steps=6", "checkpoint_every=1",
    )  # fmt: skip
    pattern = r"(the loss of|the weights after) step (\d+)"  # a loss, or an update, diverged
    with pytest.raises(NonFiniteLoss, match=pattern) as info:
        run(cfg)
    bad = int(re.search(pattern, str(info.value)).group(2))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["error"] and f"step {bad}" in summary["error"]
    saved = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "checkpoints")]
    assert all(s < bad for s in saved)
    for path in list_checkpoints(tmp_path / "checkpoints"):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


# --- the hook protocol ------------------------------------------------------------------------


class Seen(Hook):
    """What the loop hands the hooks: every record read, and the outcome; "stop" at `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.records: list[StepRecord] = []
        self.outcomes: list[Outcome] = []

    def after_update(self, progress: Progress) -> Read:
        return "stop" if progress.step == self.stop_at else "late"

    def after_step(self, record: StepRecord, progress: Progress) -> None:
        self.records.append(record)

    def after_train(self, progress: Progress, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def test_the_hook_base_has_at_most_six_seams():
    seams = [n for n in dir(Hook) if not n.startswith("_") and callable(getattr(Hook, n))]
    assert len(seams) <= 6, seams
    assert "before_step" not in seams  # implemented by no hook


def test_a_step_record_keeps_the_batch_counters_not_the_batch(tmp_path):
    seen, buckets = Seen(), BucketCountHook((1, 4), count_graphs=False)
    loop, *_ = make_loop(tmp_path, hooks=[seen, buckets])
    loop.run(epochs=1)
    assert "batch" not in {f.name for f in dataclasses.fields(StepRecord)}
    for record, batch in zip(seen.records, batches(6), strict=True):
        counts = record.counts
        assert counts == batch.host_counts()
        assert (counts.images, counts.box_rows, counts.boxes_dropped) == (2, 1, record.step - 1)
        assert counts.data == {k: getattr(batch, k, 0) for k in DATA_COUNTS}
        values = [getattr(record, f.name) for f in dataclasses.fields(record)]
        values += [getattr(counts, f.name) for f in dataclasses.fields(counts)]
        assert not any(isinstance(v, torch.Tensor) for v in values)  # plain host numbers
    # the telemetry and the bucket counts got the same numbers from the records
    assert loop.telemetry.boxes_dropped == sum(range(6))
    assert loop.telemetry.data_counts["skipped"] == sum(40 + i for i in range(6))
    assert loop.telemetry.batch_sizes == [2] * 6
    assert buckets.batches == {1: 6, 4: 0}


def val_evaluator(tiny_coco) -> Evaluator:
    """A real Evaluator on the tiny val set whose detector finds nothing (mAP 0)."""
    coco = CocoDetectionDataset(tiny_coco, "val2017").coco
    return Evaluator(lambda loader: Found(empty_results(), list(coco.imgs), 0.0, 0.0), [], coco)


@pytest.mark.parametrize(
    ("stop_at", "nan_at", "outcome", "checkpoint", "evaluated"),
    [
        (None, None, "done", "step_0000006.pt", True),
        (2, None, "interrupted", "step_0000002.pt", False),  # a hook asked to stop
        (None, 3, "failed", None, False),  # step 3's loss is NaN: raised
    ],
)
def test_after_train_gets_the_outcome(
    tmp_path, tiny_coco, stop_at, nan_at, outcome, checkpoint, evaluated
):
    """ "done" checkpoints and evaluates; "interrupted" checkpoints only (the evaluation knows
    of the stop from the outcome, not from the stop hook); "failed" writes neither."""
    seen = Seen(stop_at)
    loop, model, optimizer, scheduler, telemetry = make_loop(tmp_path, nan_at=nan_at)
    state = TrainState(model, optimizer, scheduler, None, {}, CPU)
    evals = EvalHook(val_evaluator(tiny_coco), telemetry, every_epochs=0, epochs=1)
    loop.hooks += [seen, CheckpointHook(state, tmp_path / "ckpt", 0, keep=5, main=True), evals]
    if outcome == "failed":
        with pytest.raises(NonFiniteLoss):
            loop.run(epochs=1)
    else:
        loop.run(epochs=1)
    assert seen.outcomes == [outcome]
    saved = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert saved == ([checkpoint] if checkpoint else [])
    assert len(evals.history) == int(evaluated)
    if outcome == "interrupted":
        assert [r.step for r in seen.records] == [1, 2]  # the stop step is read, then the end


def test_a_step_that_raises_logs_the_step_queued_before_it(tmp_path):
    """Step 4 raises while step 3 is queued and unread: step 3 is still read and logged."""
    seen = Seen()
    loop, *_, telemetry = make_loop(tmp_path, hooks=[seen], raise_at=4)
    with pytest.raises(RuntimeError, match="step 4 failed"):
        loop.run(epochs=1)
    assert [r.step for r in seen.records] == [1, 2, 3]
    assert len(telemetry.step_ms) == 3
    assert seen.outcomes == ["failed"]


def test_a_loader_that_raises_logs_the_step_queued_before_it(tmp_path):
    def failing() -> Iterator[FixedBatch]:
        yield from batches(2)
        raise OSError("a corrupt image")

    seen = Seen()
    loop, *_ = make_loop(tmp_path, hooks=[seen], loader=failing())
    with pytest.raises(OSError, match="corrupt"):
        loop.run(epochs=1)
    assert [r.step for r in seen.records] == [1, 2]


def test_a_second_ctrl_c_does_not_wait_to_read_the_queued_step(tmp_path):
    """KeyboardInterrupt (a second Ctrl-C abandons the step) leaves the queued step unread."""
    seen = Seen()
    loop, *_ = make_loop(tmp_path, hooks=[seen], raise_at=4, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        loop.run(epochs=1)
    assert [r.step for r in seen.records] == [1, 2]
