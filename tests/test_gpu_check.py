"""scripts/gpu_check.py: its rules (status, ratios, SKIP), its table and JSON, and real runs.

No GPU exists here: the CUDA checks are exercised by their SKIP rule, and the check logic by
`--device cpu`, which runs the same train.py subprocesses on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd_npu.tools import gpu_report
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
    assert ok.status == "PASS" and "800 img/s device" in ok.text
    assert ok.figure["device_images_per_s"] == 800.0 and ok.figure["wall_images_per_s"] == 780.0
    slow_data = gpu_check.throughput(fake_run(tmp_path, {**STEADY, "data_wait_pct": 12.0}), 64)
    assert slow_data.status == "WARN" and "data wait above 5%" in slow_data.text
    nan = gpu_check.throughput(fake_run(tmp_path, {**STEADY, "final_loss": float("nan")}), 64)
    assert nan.status == "FAIL"
    crashed = gpu_check.throughput(fake_run(tmp_path, {}, "error: boom", returncode=1), 64)
    assert crashed.status == "FAIL" and "error: boom" in crashed.text
    killed = gpu_check.throughput(fake_run(tmp_path, {}, returncode=None), 64)
    assert killed.status == "SKIP" and "deadline" in killed.text

    one = {**STEADY, "graphs_compiled": 1, "recompiles": 0, "graph_breaks": 0}
    assert gpu_check.compiled(fake_run(tmp_path, one), 64).status == "PASS"
    two = gpu_check.compiled(fake_run(tmp_path, {**one, "graphs_compiled": 2}), 64)
    assert two.status == "WARN" and two.text.startswith("2 graph(s)")
    assert gpu_check.compiled(fake_run(tmp_path, {**one, "recompiles": 1}), 64).status == "FAIL"
    # box-count buckets: one graph per bucket, each after the first a recompile
    buckets = {**one, "graphs_compiled": 3, "recompiles": 2}
    assert gpu_check.compiled(fake_run(tmp_path, buckets), 64, graphs=3).status == "PASS"
    two_of_three = {**one, "graphs_compiled": 2, "recompiles": 1}  # no image reached bucket 64
    assert gpu_check.compiled(fake_run(tmp_path, two_of_three), 64, graphs=3).status == "PASS"
    four = {**one, "graphs_compiled": 4, "recompiles": 3}
    assert gpu_check.compiled(fake_run(tmp_path, four), 64, graphs=3).status == "FAIL"

    assert gpu_check.cudagraphs(fake_run(tmp_path, one), 64).status == "PASS"
    log = "W1204 skipping cudagraphs due to mutated inputs (1 instances)\n"
    skipped = gpu_check.cudagraphs(fake_run(tmp_path, one, log), 64)
    assert skipped.status == "WARN" and "mutated inputs" in skipped.text
    counted = gpu_check.cudagraphs(fake_run(tmp_path, {**one, "cudagraph_skips": 2}), 64)
    assert counted.status == "WARN"
    # gpu_check.json's form of a check: status, figure (an object), text
    assert ok.to_json() == {"status": "PASS", "figure": ok.figure, "text": ok.text}


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
    proc = run_script("--out", str(tmp_path), "--photos-dir", str(tmp_path / "photos"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = result["checks"]
    assert list(result) == list(gpu_report.CONTRACT_KEYS)
    assert checks["preflight"]["status"] == "SKIP"
    assert "no CUDA GPU visible" in checks["preflight"]["text"]
    assert set(checks) >= {"eager_fixed_b64", "cudagraphs_b64", "resume", "torchrun_nccl",
                           *gpu_report.SUSTAINED, *gpu_report.NEVER_RUN}  # fmt: skip
    assert all(c["status"] == "SKIP" for c in checks.values())
    # every SKIP says why, and the headline pair comes right after preflight
    assert all("no CUDA GPU visible" in c["text"] for c in checks.values())
    assert list(checks)[1:3] == ["sustained_tv_eager", "sustained_fixed_graphs_device"]
    assert result["ratios"][gpu_report.HEADLINE] is None
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
    assert "no time left" in checks["eager_fixed_b64"]["text"]
    assert "needs device=cuda" in checks["cudagraphs_b64"]["text"]
    assert "no time left" in checks["sustained_tv_eager"]["text"]
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
        figure = checks[name]["figure"]
        assert figure["device_images_per_s"] > 0 and figure["wall_images_per_s"] > 0
    assert result["ratios"]["fixed_vs_dynamic_b4"] > 0
    resume = checks["resume"]
    assert resume["status"] == "PASS" and resume["figure"]["max_rel_diff"] == 0.0
    assert resume["figure"]["steps_compared"] == [3, 4]
    assert checks["eval_sheet"]["status"] == "PASS" and checks["profiler"]["status"] == "PASS"
    assert "compile_b64" not in checks  # not asked for


def test_merge_and_render_from_the_command_line(tmp_path):
    """--merge writes the contract's keys with each check's source; --render without --write
    says whether the committed docs match the file (they do for docs/gpu_check.json)."""

    def one(name, status, elapsed):
        return {"machine": {"gpu_name": name}, "checks": {"preflight": {"status": "PASS",
                "figure": {}, "text": name}, f"check_{name}": {"status": status, "figure": {},
                "text": ""}}, "ratios": {}, "overrides": [f"x={name}"], "deadline_s": 600.0,
                "elapsed_s": elapsed}  # fmt: skip

    a, b = tmp_path / "a" / "gpu_check.json", tmp_path / "b" / "gpu_check.json"
    for path, result in ((a, one("A", "PASS", 100.0)), (b, one("B", "WARN", 50.0))):
        path.parent.mkdir()
        path.write_text(json.dumps(result))
    merged = tmp_path / "merged.json"
    proc = run_script("--merge", str(a), str(b), "--merge-out", str(merged))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(merged.read_text())
    assert list(result)[:6] == list(gpu_report.CONTRACT_KEYS)
    assert result["checks"]["preflight"]["source"] == str(b)  # the later run's
    assert result["checks"]["check_A"]["source"] == str(a)
    assert result["elapsed_s"] == 150.0 and result["overrides"] == ["x=A", "x=B"]
    assert set(result["sources"]) == {str(a), str(b)}

    proc = run_script("--render", str(REPO / "docs" / "gpu_check.json"))
    assert proc.returncode == 0, proc.stdout
    assert "wall clock" in proc.stdout


@pytest.mark.slow
def test_sustained_checks_on_cpu(tmp_path, tiny_coco):
    """`--device cpu` with tiny sizes: the sustained checks write a photo set, time real runs
    and report the contract's figure; the CUDA-only ones SKIP and say why. A second run keeps
    the photo set."""
    photos = tmp_path / "photos"
    args = (
        "--device", "cpu", "--checks", "preflight,sustained", "--photos", "6",
        "--photos-dir", str(photos), "--sustained-steps", "3", "--batches", "2,2",
        "--workers", "0", "--bench-images", "3", "--bench-repeats", "1", "canvas=[64,64]",
        "max_boxes=8",
    )  # fmt: skip
    proc = run_script("--out", str(tmp_path / "one"), *args, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "one" / "gpu_check.json").read_text())
    assert list(result) == list(gpu_report.CONTRACT_KEYS)
    checks = result["checks"]
    assert result["machine"]["sustained_data"]["written_now"] is True
    for name in ("sustained_tv_eager", "sustained_fixed_eager", "sustained_fixed_eager_device"):
        check = checks[name]
        assert check["status"] in ("PASS", "WARN"), check
        figure = check["figure"]
        assert set(gpu_report.SUSTAINED_KEYS) <= set(figure)
        assert figure["train_images"] == 6 and figure["steady_steps"] >= 3
        assert figure["wall_images_per_s"] > 0 and figure["device_images_per_s"] > 0
        assert figure["cores_needed"] > 0 and figure["host_cpu_pct"] > 0
        assert figure["cudnn_benchmark"] is True
        # the figure is the run's own summary.json, read by sustained_figure
        summary = json.loads((tmp_path / "one" / name / "summary.json").read_text())
        assert figure["device_images_per_s"] == round(summary["steady_images_per_s"], 1)
        assert figure["steady_steps"] == summary["steps"] - summary["warmup_steps"]
    variants = {n: checks[n]["figure"]["bench_variant"] for n in checks if "figure" in checks[n]
                and "bench_variant" in checks[n]["figure"]}  # fmt: skip
    assert variants == {"sustained_tv_eager": "torchvision_reference",
                        "sustained_fixed_eager": "fixed_stretch",
                        "sustained_fixed_eager_device": "fixed_device"}  # fmt: skip
    for name in ("sustained_fixed_graphs_device", "sustained_fixed_graphs"):
        assert checks[name]["status"] == "SKIP" and "needs device=cuda" in checks[name]["text"]
    assert result["ratios"]["wall_fixed_eager_vs_tv_eager"] > 0
    assert result["ratios"][gpu_report.HEADLINE] is None  # CUDA graphs: cuda only

    manifest = (photos / "photo_set.json").stat().st_mtime_ns
    proc = run_script("--out", str(tmp_path / "two"), *args, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = json.loads((tmp_path / "two" / "gpu_check.json").read_text())
    assert again["machine"]["sustained_data"]["written_now"] is False
    assert (photos / "photo_set.json").stat().st_mtime_ns == manifest


@pytest.mark.slow
def test_bench_check_reads_bench_json(tmp_path, tiny_coco):
    """The bench_cuda check's reading of scripts/bench.py's bench.json, on the CPU (the check
    itself SKIPs without cuda): a real bench.py run, its variants' steady img/s."""
    words = ["data=coco", f"data.root={tiny_coco}", "data.num_classes=6", "canvas=[64,64]",
             "max_boxes=8"]  # fmt: skip
    runner = gpu_check.Runner(tmp_path, time.monotonic() + 600, "cpu", words, workers=0)
    check = gpu_check.bench_cuda(runner, batch=2, steps=3)
    assert check.status == "PASS", check.text
    assert set(check.figure["images_per_s"]) == {"tv_eager", "fixed_eager"}
    assert all(v > 0 for v in check.figure["images_per_s"].values())
