"""scripts/bench.py on the CPU runs every CPU variant and writes bench.json, even when
tv_compiled stops at the recompile limit before it has a steady time.

Slow: fixed_compiled is one real inductor compile (64 px canvas) and the others train a few
steps each, all in one subprocess.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CPU_VARIANTS = {
    "tv_eager", "fixed_eager", "floor", "floor_no_loader", "fixed_compiled", "tv_compiled",
}  # fmt: skip


@pytest.mark.slow
def test_bench_on_cpu_writes_bench_json_with_tv_compiled_stopped(tiny_coco, tmp_path):
    overrides = tiny_overrides(
        tiny_coco,
        "bench.steps=3",
        "bench.repeats=2",
        "canvas=[64,64]",
        "max_boxes=8",
        # torchvision's per-image code compiles a second graph within its first step: with a
        # limit of 1, tv_compiled stops there, before any step has a time
        "compiler.recompile_limit=1",
        "data.slot=[128,128]",
        f"hydra.run.dir={tmp_path}",
    )
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), *overrides]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    runs = result["runs"]
    assert set(runs) == CPU_VARIANTS
    assert set(result["skipped"]) == {"fixed_compiled_reduce_overhead"}
    assert runs["tv_compiled"]["stopped_by"] == "recompile limit"
    for name, r in runs.items():
        for key in ("vs_tv_eager", "vs_floor"):
            value = r[key]
            assert value is None or (isinstance(value, float) and math.isfinite(value)), (name, r)
        if r["steady_step_ms"] is None:  # no steady time: no ratio, rather than a crash
            assert r["vs_tv_eager"] is None and r["vs_floor"] is None, (name, r)
    for name in CPU_VARIANTS - {"tv_compiled"}:
        assert runs[name]["stopped_by"] == "steps" and runs[name]["steps"] == 3
        assert runs[name]["vs_tv_eager"] > 0 and runs[name]["vs_floor"] > 0
    assert runs["tv_eager"]["vs_tv_eager"] == 1.0
    # two rounds, each ratio taken within a round; the run's ratio is their median
    assert result["repeats"] == 2
    assert result["canvas"] == [64, 64] and result["canvas_from"] == "command line"
    fair = result["ratios"]["fixed_eager_vs_floor"]
    assert len(fair["rounds"]) == 2 and fair["min"] <= fair["median"] <= fair["max"]
    assert runs["fixed_eager"]["vs_floor"] == fair["median"]
    for name in CPU_VARIANTS - {"tv_compiled"}:
        steady = runs[name]["steady_step_ms_rounds"]
        assert len(steady) == 2 and runs[name]["steady_step_ms"] == pytest.approx(sum(steady) / 2)
    assert (tmp_path / "round1" / "fixed_eager").is_dir()  # round 2's events apart
    assert "canvas 64x64 (command line); medians over 2 round(s)" in run.stdout
    assert "| tv_compiled |" in run.stdout
    augment = result["device_augment"]  # data.augment_on=device's share, timed alone
    assert augment["canvas"] == [64, 64] and augment["slot"] == [128, 128]
    assert augment["recipe"] == "ssdlite" and augment["batch_size"] == 2
    assert 0 < augment["batch_ms"] < augment["batch_64_ms"]
    assert augment["vs_fixed_eager_step"] == pytest.approx(
        augment["batch_ms"] / runs["fixed_eager"]["steady_step_ms"]
    )
    assert "ms per batch of 64" in run.stdout
