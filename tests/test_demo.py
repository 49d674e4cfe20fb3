"""The README's first command as a new user runs it: the default run trains on its set."""

from __future__ import annotations

import json
import statistics

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssd_npu.engine.telemetry import read_scalar_series
from tests.helpers import run_train


@pytest.mark.slow
def test_default_run_trains_and_evaluates_twice(tmp_path):
    """`python train.py` with no overrides (about 3 minutes on 2 CPU cores): the demo's own
    schedule (canvas 224, 416 steps), evaluations at epoch 7 and at the end with their
    detection pictures, a training loss that falls, and a detector that learnt.

    mAP50 >= 0.4 is a margin below the slowest of the seeds docs/demo.md measured (each of
    seeds 0-4 ends at 0.62 or more on the development machine): another CPU rounds
    differently and draws another trajectory, and this bound holds for any of them."""
    run = run_train(f"hydra.run.dir={tmp_path}", timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 416 and summary["error"] is None
    history = summary["eval"]["history"]
    assert [h["step"] for h in history] == [224, 416]
    assert all(0.0 <= h["mAP50"] <= 1.0 and h["num_images"] == 48 for h in history)
    steps, loss = read_scalar_series(tmp_path, "loss/total")["loss/total"]
    assert steps == list(range(1, 417))
    first, last = statistics.fmean(loss[:32]), statistics.fmean(loss[-32:])
    assert last < 0.75 * first, (first, last, summary["eval"]["mAP50"])
    assert summary["eval"]["mAP50"] >= 0.4, history
    # pictures: read_scalar_series reads scalars only
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("eval/detections")] == [224, 416]
