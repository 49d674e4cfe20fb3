"""The README's first command as a new user runs it: the default run learns its synthetic set."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_train


@pytest.mark.slow
def test_default_run_learns_the_synthetic_set(tmp_path):
    """`python train.py` with no overrides (about 3 minutes on 2 CPU cores): the set's own
    schedule (256 steps), evaluations half-way and at the end with their detection pictures,
    and mAP50 >= 0.5 on the val split (0.68 for seed 0 on the development machine)."""
    run = run_train(f"hydra.run.dir={tmp_path}", timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 256 and summary["error"] is None
    assert [h["step"] for h in summary["eval"]["history"]] == [128, 256]
    assert summary["eval"]["mAP50"] >= 0.5, summary["eval"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("eval/detections")] == [128, 256]
