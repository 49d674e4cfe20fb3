"""scripts/gpu_check.py: its rules (status, ratios, SKIP), its table and JSON, and real runs.

No GPU exists here: the CUDA checks are exercised by their SKIP rule, and the check logic by
`--device cpu`, which runs the same train.py subprocesses on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while being made
_spec.loader.exec_module(gpu_check)


def fake_run(tmp_path: Path, summary: dict, log: str = "", returncode: int | None = 0):
    """A finished run's folder as train.py leaves it (summary.json), for the status rules."""
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return gpu_check.Run("run", folder, returncode, 1.0, log)


STEADY = {"steady_images_per_s": 800.0, "steady_wall_images_per_s": 780.0, "data_wait_pct": 1.0,
          "steady_step_ms": 80.0, "first_step_ms": 900.0, "final_loss": 3.5}  # fmt: skip


def test_status_rules(tmp_path):
    ok = gpu_check.throughput(fake_run(tmp_path, STEADY), 64)
    assert ok.status == "PASS" and "800 img/s device" in ok.figure
    slow_data = gpu_check.throughput(fake_run(tmp_path, {**STEADY, "data_wait_pct": 12.0}), 64)
    assert slow_data.status == "WARN" and "data wait above 5%" in slow_data.figure
    nan = gpu_check.throughput(fake_run(tmp_path, {**STEADY, "final_loss": float("nan")}), 64)
    assert nan.status == "FAIL"
    crashed = gpu_check.throughput(fake_run(tmp_path, {}, "error: boom", returncode=1), 64)
    assert crashed.status == "FAIL" and "error: boom" in crashed.figure
    killed = gpu_check.throughput(fake_run(tmp_path, {}, returncode=None), 64)
    assert killed.status == "SKIP" and "deadline" in killed.figure

    one = {**STEADY, "graphs_compiled": 1, "recompiles": 0, "graph_breaks": 0}
    assert gpu_check.compiled(fake_run(tmp_path, one), 64).status == "PASS"
    two = gpu_check.compiled(fake_run(tmp_path, {**one, "graphs_compiled": 2}), 64)
    assert two.status == "WARN" and two.figure.startswith("2 graph(s)")
    assert gpu_check.compiled(fake_run(tmp_path, {**one, "recompiles": 1}), 64).status == "FAIL"

    assert gpu_check.cudagraphs(fake_run(tmp_path, one), 64).status == "PASS"
    log = "W1204 skipping cudagraphs due to mutated inputs (1 instances)\n"
    skipped = gpu_check.cudagraphs(fake_run(tmp_path, one, log), 64)
    assert skipped.status == "WARN" and "mutated inputs" in skipped.figure
    counted = gpu_check.cudagraphs(fake_run(tmp_path, {**one, "cudagraph_skips": 2}), 64)
    assert counted.status == "WARN"


def test_ratios_and_data_pressure():
    def timed(images, wall, wait=1.0):
        details = {"images_per_s": images, "wall_images_per_s": wall, "data_wait_pct": wait}
        return gpu_check.Check("PASS", "", details)

    checks = {
        "eager_fixed_b64": timed(1000.0, 990.0),
        "eager_dynamic_b64": timed(500.0, 480.0),
        "cudagraphs_b64": timed(4000.0, 2000.0, wait=40.0),
        "amp_bf16_b64": gpu_check.Check("SKIP", "no time left"),
    }
    r = gpu_check.ratios(checks)
    assert r["fixed_vs_dynamic_b64"] == 2.0
    assert r["graphs_vs_eager_b64"] == 4.0
    assert r["graphs_vs_tv_eager_b64"] == 8.0
    assert r["graphs_vs_tv_eager_b64_wall"] == round(2000.0 / 480.0, 3)
    assert r["amp_bf16_vs_fp32_b64"] is None and r["compiled_vs_eager_b64"] is None
    # the fastest run waits 40% of its time with 14 workers: 2000 img/s / 14 per worker, and
    # 4000 img/s needs ceil(4000 / (2000 / 14)) = 28 workers
    d = gpu_check.data_pressure(checks, workers=14)
    assert d["workers_needed"] == 28 and d["fastest_images_per_s"] == 4000.0


def test_merge_overrides_later_wins():
    merged = gpu_check.merge_overrides(["eval=false", "num_workers=14"], ["eval=true"], ["a.b=1"])
    assert merged == ["eval=true", "num_workers=14", "a.b=1"]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_without_cuda_every_check_skips_and_says_why(tmp_path):
    proc = run_script("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = result["checks"]
    assert checks["preflight"]["status"] == "SKIP"
    assert "no CUDA GPU visible" in checks["preflight"]["figure"]
    assert set(checks) >= {"eager_fixed_b64", "cudagraphs_b64", "resume", "torchrun_nccl"}
    assert all(c["status"] == "SKIP" for c in checks.values())
    assert result["machine"]["gpus"] == 0 and result["machine"]["torch"] == torch.__version__
    # one table row per check
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == list(checks)


def test_past_the_deadline_checks_skip(tmp_path, tiny_coco):
    proc = run_script(
        "--device", "cpu", "--deadline-s", "0", "--out", str(tmp_path),
        "data=coco", f"data.root={tiny_coco}", "data.num_classes=6",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert checks["preflight"]["status"] == "PASS"
    assert checks["eager_fixed_b64"]["status"] == "SKIP"
    assert "no time left" in checks["eager_fixed_b64"]["figure"]
    assert "needs device=cuda" in checks["cudagraphs_b64"]["figure"]
    assert not list(tmp_path.glob("eager_*"))  # nothing was started


def test_bad_argument_is_one_clear_error(tmp_path):
    proc = run_script("--checks", "eager,warp", "--out", str(tmp_path))
    assert proc.returncode == 2 and "warp" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_real_runs_on_cpu(tmp_path, tiny_coco):
    """The runs for real (device=cpu, tiny): throughput rows with figures, and a resume whose
    losses equal the uninterrupted run's exactly (the CPU is deterministic)."""
    proc = run_script(
        "--device", "cpu", "--out", str(tmp_path), "--steps", "4", "--batches", "4,2",
        "--workers", "0", "--checks", "preflight,eager,resume", "--deadline-s", "600",
        "data=coco", f"data.root={tiny_coco}", "data.num_classes=6", "canvas=[64,64]",
        "max_boxes=8",
    timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = result["checks"]
    for name in ("eager_fixed_b4", "eager_dynamic_b4", "eager_fixed_b2", "eager_dynamic_b2"):
        assert checks[name]["status"] in ("PASS", "WARN"), checks[name]
        assert checks[name]["images_per_s"] > 0 and checks[name]["wall_images_per_s"] > 0
    assert result["ratios"]["fixed_vs_dynamic_b4"] > 0
    assert checks["resume"]["status"] == "PASS" and checks["resume"]["max_rel_diff"] == 0.0
    assert checks["resume"]["steps_compared"] == [3, 4]
    assert checks["eval_sheet"]["status"] == "PASS" and checks["profiler"]["status"] == "PASS"
    assert "compile_b64" not in checks  # not asked for
