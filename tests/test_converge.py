"""scripts/converge.py: whole runs of both paths from the same seeds, read back and compared."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import FAST, REPO, tiny_overrides

_spec = importlib.util.spec_from_file_location("converge", REPO / "scripts" / "converge.py")
converge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(converge)


def _row(path, seed, mAP, mAP50):
    return {"path": path, "seed": seed, "mAP": mAP, "mAP50": mAP50, "wall_s": 1.0}


def test_compare_pairs_by_seed():
    rows = [
        _row("fixed", 0, 0.30, 0.60),
        _row("dynamic", 0, 0.28, 0.62),
        _row("fixed", 1, 0.34, 0.66),
        _row("dynamic", 1, 0.30, 0.60),
    ]
    result = converge.compare(rows)
    assert result["paths"]["fixed"]["mAP50"]["mean"] == pytest.approx(0.63)
    assert result["paths"]["dynamic"]["mAP"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    diff = result["difference"]["mAP50"]
    assert diff["mean"] == pytest.approx(0.02) and diff["seeds"] == [0, 1]
    assert diff["std"] == pytest.approx(0.0565685, rel=1e-4)
    # two seeds: the bootstrap means are -0.02, 0.02 or 0.06 (each seed drawn 0, 1 or 2 times)
    assert diff["ci95"] == [pytest.approx(-0.02), pytest.approx(0.06)]
    # spread: the larger seed-to-seed std (0.0424 for fixed mAP50) covers |0.02|
    assert diff["within_spread"] is True
    far = converge.compare([_row("fixed", 0, 0.5, 0.9), _row("dynamic", 0, 0.1, 0.2),
                            _row("fixed", 1, 0.5, 0.9), _row("dynamic", 1, 0.1, 0.2)])  # fmt: skip
    assert far["difference"]["mAP50"]["within_spread"] is False
    # an unpaired seed (a stopped comparison) is left out of the difference
    assert converge.compare(rows[:3])["difference"]["mAP"]["seeds"] == [0]


def test_bootstrap_ci_of_the_paired_mean():
    assert converge.bootstrap_ci([0.02] * 5) == [pytest.approx(0.02), pytest.approx(0.02)]
    diffs = [0.10, -0.05, 0.02, 0.07, -0.01]
    low, high = converge.bootstrap_ci(diffs)
    assert low < sum(diffs) / 5 < high and converge.bootstrap_ci(diffs) == [low, high]
    # many seeds: the interval approaches the normal one, mean +- 1.96 sigma / sqrt(n)
    rng = np.random.default_rng(1)
    sample = rng.normal(0.1, 0.05, size=400)
    low, high = converge.bootstrap_ci(sample.tolist())
    half = 1.96 * sample.std(ddof=1) / np.sqrt(len(sample))
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(sample.mean(), abs=0.1 * half)


@pytest.mark.slow  # 4 subprocesses, ~20 s; the quick tests above and below cover the script
def test_converge_runs_both_paths_and_resumes(tiny_coco, tmp_path):
    cmd = [
        sys.executable, str(REPO / "scripts" / "converge.py"),
        *tiny_overrides(tiny_coco, *FAST, "eval=true", "max_steps=2", "epochs=1"),
        "converge.seeds=[3]", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "converge.json").read_text())
    assert [(r["path"], r["seed"]) for r in result["runs"]] == [("fixed", 3), ("dynamic", 3)]
    for r in result["runs"]:
        summary = json.loads((tmp_path / f"{r['path']}_seed3" / "summary.json").read_text())
        assert summary["shape"] == r["path"] and summary["eval"]["mAP50"] == r["mAP50"]
        wall = json.loads((tmp_path / f"{r['path']}_seed3" / "converge_wall.json").read_text())
        assert wall["wall_s"] == r["wall_s"] > 0  # timing beside summary.json, not in it
        assert 0.0 <= r["mAP50"] <= 1.0
    assert set(result["difference"]) == {"mAP", "mAP50"}
    assert "| fixed - dynamic |" in run.stdout
    # both runs' learning curves on one picture (scripts/plot_curves.py)
    png = tmp_path / "curves.png"
    plot = [sys.executable, str(REPO / "scripts" / "plot_curves.py"),
            str(tmp_path / "fixed_seed3"), str(tmp_path / "dynamic_seed3"), "--out", str(png)]  # fmt: skip
    drawn = subprocess.run(plot, capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    with Image.open(png) as im:
        assert im.size == (1210, 440)  # 11 x 4 inches at 110 dpi
    # started again in the same folder: both runs are read back, none trained again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ssd-npu: device=" not in again.stdout  # no run's banner: nothing was trained
    assert json.loads((tmp_path / "converge.json").read_text())["runs"] == result["runs"]


def test_bad_seeds_is_one_message(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "converge.py"), "converge.seeds=[1,1]",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and "converge.seeds=[1, 1] is not valid" in run.stderr


def test_compare_device_against_host_augmentation():
    rows = [_row("device", 0, 0.30, 0.60), _row("host", 0, 0.28, 0.62),
            _row("device", 1, 0.34, 0.66), _row("host", 1, 0.30, 0.60)]  # fmt: skip
    result = converge.compare(rows, ("device", "host"))
    assert set(result["paths"]) == {"device", "host"}
    assert result["difference"]["mAP50"]["mean"] == pytest.approx(0.02)
    assert "| device - host | paired mean" in converge.table(rows, result, ("device", "host"))


@pytest.mark.slow  # 2 subprocess runs, ~15 s
def test_converge_compares_augmentation_on_device_and_host(tiny_coco, tmp_path):
    cmd = [
        sys.executable, str(REPO / "scripts" / "converge.py"),
        *tiny_overrides(tiny_coco, *FAST, "eval=true", "max_steps=2", "epochs=1"),
        "data.slot=[320,320]", "converge.compare=augment_on", "converge.seeds=[3]",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "converge.json").read_text())
    assert [(r["path"], r["seed"]) for r in result["runs"]] == [("device", 3), ("host", 3)]
    for r in result["runs"]:
        summary = json.loads((tmp_path / f"{r['path']}_seed3" / "summary.json").read_text())
        assert summary["augment_on"] == r["path"] and summary["shape"] == "fixed"
    assert "| device - host |" in run.stdout


def test_bad_comparison_is_one_message(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "converge.py"), "converge.compare=fit",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and "converge.compare='fit' is not valid" in run.stderr


def _diffs_ci(diffs):
    return converge.bootstrap_ci(diffs)


def test_stop_rule_on_synthetic_differences():
    stop = converge.stop_reason
    narrow, wide = [0.01, -0.01, 0.0, 0.02], [0.3, -0.3, 0.2, -0.25]
    # no target: the listed seeds, then stop
    assert stop(narrow[:2], _diffs_ci, None, 3, 24, listed=3) is None
    assert stop(narrow[:3], _diffs_ci, None, 3, 24, listed=3) == "seeds"
    # a target: not before min_seeds, however narrow the interval
    assert stop(narrow[:2], _diffs_ci, 0.05, 3, 24, listed=3) is None
    assert stop(narrow[:3], _diffs_ci, 0.05, 3, 24, listed=3) == "target"
    assert converge.halfwidth(converge.bootstrap_ci(narrow[:3])) <= 0.05
    # a wide interval goes on until max_seeds
    assert stop(wide, _diffs_ci, 0.05, 3, 5, listed=3) is None
    assert stop([*wide, 0.1], _diffs_ci, 0.05, 3, 5, listed=3) == "max_seeds"


def test_seed_sequence_continues_past_the_listed_seeds():
    assert converge.seed_sequence([0, 1, 2], None, 24) == [0, 1, 2]
    assert converge.seed_sequence([3, 0], 0.05, 5) == [3, 0, 4, 5, 6]
    assert converge.seed_sequence([0, 1, 2], 0.05, 2) == [0, 1]


def test_bad_jobs_is_one_message(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "converge.py"), "converge.jobs=0",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and "converge.jobs=0 / converge.threads=None" in run.stderr


@pytest.mark.slow  # 2 x 4 tiny runs in subprocesses, ~40 s
def test_parallel_runs_give_the_sequential_rows(tiny_coco, tmp_path):
    def converge_json(jobs: int, *extra: str) -> dict:
        out = tmp_path / f"jobs{jobs}"
        cmd = [
            sys.executable, str(REPO / "scripts" / "converge.py"),
            *tiny_overrides(tiny_coco, *FAST, "eval=true", "max_steps=2", "epochs=1"),
            "converge.seeds=[0,1]", f"converge.jobs={jobs}", "converge.threads=1",
            f"hydra.run.dir={out}", *extra,
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "stopped by seeds: 2 seeds" in run.stdout
        return json.loads((out / "converge.json").read_text())

    one, two = converge_json(1), converge_json(2)
    assert (one["jobs"], two["jobs"], one["threads"], two["threads"]) == (1, 2, 1, 1)
    without_wall = [[{k: v for k, v in r.items() if k != "wall_s"} for r in x["runs"]]
                    for x in (one, two)]  # fmt: skip
    assert without_wall[0] == without_wall[1]  # the same rows, mAP and mAP50 exactly
    assert [(r["path"], r["seed"]) for r in two["runs"]] == [
        ("fixed", 0), ("dynamic", 0), ("fixed", 1), ("dynamic", 1)
    ]  # fmt: skip
    assert one["difference"] == two["difference"] and two["stopped_by"] == "seeds"
