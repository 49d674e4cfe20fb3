"""scripts/bench_eval.py on a small generated result: every phase, both engines, both modes,
the same stats, a table and bench_eval.json."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, tiny_overrides


def test_bench_eval_times_a_generated_result_by_phase(tmp_path):
    out = tmp_path / "bench_eval.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_eval.py", "bench.eval_images=30",
         "bench.eval_per_image=20", "bench.eval_rounds=1", f"bench.out={out}",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| records | bulk |" in proc.stdout and "| faster_background |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["images"] == 30 and report["detections"] == 600
    assert 150 < report["gt_boxes"] < 300  # about val2017's 7.6 per image
    assert report["max_stat_difference"] <= 1e-4
    assert report["cocoeval"]["faster"]["stats"] == pytest.approx(
        report["cocoeval"]["pycocotools"]["stats"], abs=1e-4
    )
    assert set(report["records"]) == {"loop", "bulk"}
    modes = {f"{e}_{m}" for e in ("faster", "pycocotools") for m in ("sync", "background")}
    assert set(report["modes"]) == modes
    for mode in report["modes"].values():
        assert mode["stall_s"] > 0 and mode["result_s"] > 0


def test_bench_eval_times_the_model_variants(tiny_coco, tmp_path):
    """The model's val passes (postprocess on the host and on the device) still run."""
    out = tmp_path / "bench_eval.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_eval.py", *tiny_overrides(tiny_coco, "canvas=[128,128]"),
         "bench.eval_rounds=1", f"bench.out={out}", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"host", "device"}
    assert runs["host"]["images"] == runs["device"]["images"] == 6
    # an untrained network's near-tied scores may keep other boxes at a tie: counts only
    assert runs["host"]["num_detections"] > 0 and runs["device"]["num_detections"] > 0
