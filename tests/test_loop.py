"""The loop never waits for the device inside the steady loop, and a non-finite loss stops it.

A device seam (`RecordingDevice`) logs the order of step launches and host reads: the loop
must queue step k+1 before it reads step k's losses, except for steps a hook asks to read at
once (a checkpoint). A NaN in step k stops training with a message naming step k, at most one
step later, and the last checkpoint written is a good one.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ssd_npu.checkpoint import TrainState, list_checkpoints
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.device import Device, HostCopy
from ssd_npu.engine import NonFiniteLoss, TrainLoop
from ssd_npu.hooks import CheckpointHook
from ssd_npu.step import TrainStep
from ssd_npu.telemetry import Telemetry

EVENTS: list[tuple[str, int]] = []


class _LoggedCopy(HostCopy):
    def __init__(self, tensor: torch.Tensor, step: int) -> None:
        super().__init__(tensor, "cpu")
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
    """A linear model's squared output; NaN from step `nan_at` on (1-based)."""

    def __init__(self, model: nn.Module, nan_at: int | None = None) -> None:
        self.model, self.nan_at = model, nan_at

    def __call__(self, batch: FixedBatch) -> dict[str, torch.Tensor]:
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
        )

    return [one(i) for i in range(n)]


def make_loop(tmp_path, nan_at=None, hooks=()):
    EVENTS.clear()
    torch.manual_seed(0)
    model = nn.Linear(48, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    telemetry = Telemetry(tmp_path, 0, enabled=False)
    device = RecordingDevice("cpu", None)
    step = ToyStep(model, nan_at)
    loop = TrainLoop(step, optimizer, scheduler, batches(6), None, device, telemetry, hooks)
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
    state = TrainState(model, optimizer, scheduler, None, {})
    loop.hooks.append(CheckpointHook(state, tmp_path / "ckpt", every=3, keep=5, main=True))
    loop.run(epochs=1)
    # step 3 is saved with exactly its own weights: read before step 4 is launched
    assert EVENTS.index(("read", 3)) < EVENTS.index(("launch", 4))
    assert EVENTS.index(("launch", 3)) < EVENTS.index(("read", 2))  # others stay one late
    saved = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert saved == ["step_0000003.pt", "step_0000006.pt"]


def test_nan_at_step_k_stops_naming_step_k_and_keeps_the_last_good_checkpoint(tmp_path):
    loop, model, optimizer, scheduler, telemetry = make_loop(tmp_path, nan_at=4)
    state = TrainState(model, optimizer, scheduler, None, {})
    loop.hooks.append(CheckpointHook(state, tmp_path / "ckpt", every=2, keep=5, main=True))
    with pytest.raises(NonFiniteLoss, match=r"the loss of step 4 \(epoch 0\) is not finite"):
        loop.run(epochs=1)
    assert launched() <= 5  # at most one step after the bad one
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_0000002.pt"]
    assert len(telemetry.step_ms) == 3  # steps 1-3 logged, the bad one not


def test_nan_in_a_real_run_names_the_step(tiny_coco, tmp_path):
    """Through train.run: the error names a step, summary.json records it, no NaN checkpoint."""
    import json

    from ssd_npu.train import run
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(
        tiny_coco, tmp_path, "canvas=[128,128]", "max_boxes=8", "eval=false", "optim.lr=1e12",
        "optim.warmup_steps=0", "max_steps=6", "checkpoint_every=1",
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
