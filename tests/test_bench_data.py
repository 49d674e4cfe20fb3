"""scripts/bench_data.py runs end to end and writes bench_data.json with every variant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"decode_only", "torchvision_reference", "fixed_stretch", "fixed_letterbox",
            "fixed_pad", "fixed_stretch_reduced", "fixed_letterbox_reduced",
            "fixed_pad_reduced", "fixed_device", "fixed_device_decode"}  # fmt: skip


def test_bench_data_writes_every_variant(tiny_coco, tmp_path):
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_data.py"), "--images", "3",
        "--repeats", "1", "--workers", "1", "data=coco", f"data.root={tiny_coco}",
        "data.num_classes=6", "canvas=[96,128]", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "bench_data.json").read_text())
    assert set(result["variants"]) == VARIANTS
    for v in result["variants"].values():
        assert v["images_per_s_per_core"] > 0 and len(v["repeats_ms"]) == 1
        per_1000 = pytest.approx(1e3 / v["images_per_s_per_core"], rel=0.01, abs=0.01)
        assert v["cores_per_1000_img_s"] == per_1000
    assert result["variants"]["torchvision_reference"]["vs_torchvision"] == 1.0
    assert set(result["loader"]) == {"fixed_stretch", "fixed_stretch_reduced"}
    assert result["data"]["images"] == 3 and result["data"]["canvas"] == [96, 128]
    assert "| fixed_pad_reduced |" in run.stdout and "| fixed_device |" in run.stdout
    assert "cores per 1000 img/s" in run.stdout
