"""`startup_s`: launch to the training loop, in the banner and in summary.json."""

from __future__ import annotations

import json

from tests.helpers import run_train, tiny_overrides


def test_startup_and_data_time_in_banner_and_summary(tiny_coco, tmp_path):
    args = tiny_overrides(tiny_coco, "max_steps=1", "eval=false", "canvas=[128,128]")
    proc = run_train(*args, f"hydra.run.dir={tmp_path}", f"out_dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the process's age: the interpreter, imports and config count, not only the data sets
    assert summary["startup_s"] > summary["data_s"] > 0
    banner = next(line for line in proc.stdout.splitlines() if line.startswith("ssd-npu: device="))
    assert " data_s=" in banner and " startup_s=" in banner
