"""ssd_npu.tools.gpu_report: the sustained figure and its verdict, the ratios, merging runs,
converting the file from before the contract, and the docs rendered from gpu_check.json
(the committed README.md and docs/bench.md must equal the render of docs/gpu_check.json)."""

from __future__ import annotations

import json
import math

import pytest

from ssd_npu.tools import gpu_report
from tests.helpers import REPO

# a summary.json's timing keys as train.py writes them (ssd_npu Telemetry.summary)
SUMMARY = {"steps": 205, "warmup_steps": 2, "steady_step_ms": 16.0,
           "steady_images_per_s": 4000.0, "steady_wall_step_ms": 20.0,
           "steady_wall_images_per_s": 3200.0, "data_wait_pct": 3.0, "first_step_ms": 90000.0,
           "final_loss": 6.5, "batch_size": 64, "graphs_compiled": 1, "recompiles": 0}  # fmt: skip


def sustained(**over):
    figure = gpu_report.sustained_figure(
        SUMMARY, train_images=4096, wall_s=200.0, cpu_s=1600.0, images_per_s_per_core=250.0
    )
    return {**figure, **over}


def test_sustained_figure():
    f = sustained()
    assert set(gpu_report.SUSTAINED_KEYS) <= set(f)
    assert f["steady_steps"] == 203  # steps after the warm-up
    assert f["wall_images_per_s"] == 3200.0 and f["device_images_per_s"] == 4000.0
    assert f["cores_needed"] == 16.0  # 4000 img/s / 250 img/s per core
    assert f["host_cpu_pct"] == 800.0  # 1600 CPU s over 200 wall s: eight cores busy
    empty = gpu_report.sustained_figure(
        {}, train_images=None, wall_s=1.0, cpu_s=None, images_per_s_per_core=None
    )
    assert all(empty[k] is None for k in gpu_report.SUSTAINED_KEYS)


def test_sustained_verdict():
    assert gpu_report.sustained_verdict(sustained(), 200)[0] == "PASS"
    status, text = gpu_report.sustained_verdict(sustained(), 400)
    assert status == "WARN" and "fewer than the 400 steady steps" in text
    status, text = gpu_report.sustained_verdict(sustained(data_wait_pct=12.0), 200)
    assert status == "WARN" and "data wait above 5%" in text
    assert gpu_report.sustained_verdict(sustained(final_loss=math.nan), 200)[0] == "FAIL"
    assert "3,200 img/s wall, 4,000 device" in text and "cores needed 16.00" in text


def check(figure, status="PASS"):
    return {"status": status, "figure": figure, "text": ""}


def test_ratios_headline_is_wall_clock():
    checks = {
        "sustained_tv_eager": check({"wall_images_per_s": 400.0, "device_images_per_s": 500.0}),
        "sustained_fixed_graphs_device": check(
            {"wall_images_per_s": 3200.0, "device_images_per_s": 4000.0}
        ),
        "eager_fixed_b64": check({"device_images_per_s": 1000.0}),
        "eager_dynamic_b64": check({"device_images_per_s": 500.0}),
        "cudagraphs_b64": check({"device_images_per_s": 4000.0}),
        "amp_bf16_b64": {"status": "SKIP", "figure": {}, "text": "no time left"},
    }
    r = gpu_report.ratios(checks)
    assert r[gpu_report.HEADLINE] == 8.0  # 3200 / 400 by the wall clock
    assert r["device_fixed_graphs_vs_tv_eager"] == 8.0
    assert r["fixed_vs_dynamic_b64"] == 2.0 and r["graphs_vs_eager_b64"] == 4.0
    assert r["amp_bf16_vs_fp32_b64"] is None and r["wall_fixed_eager_vs_tv_eager"] is None


def run(gpu, checks, elapsed, overrides=()):
    return {"machine": {"gpu_name": gpu}, "checks": checks, "ratios": {},
            "overrides": list(overrides), "deadline_s": 600.0, "elapsed_s": elapsed}  # fmt: skip


def test_merge_keeps_provenance():
    a = run("H100", {"preflight": check({}), "sustained_tv_eager": check(
        {"wall_images_per_s": 400.0})}, 500.0, ["a=1"])  # fmt: skip
    b = run("H200", {"preflight": check({}, "WARN"), "sustained_fixed_graphs_device": check(
        {"wall_images_per_s": 3000.0})}, 300.0, ["a=1", "b=2"])  # fmt: skip
    merged = gpu_report.merge([("a.json", a), ("b.json", b)])
    assert list(merged)[:6] == list(gpu_report.CONTRACT_KEYS)
    assert merged["machine"] == {"gpu_name": "H100"}  # the first run's; each in sources
    assert merged["sources"]["b.json"]["machine"] == {"gpu_name": "H200"}
    assert merged["sources"]["a.json"]["elapsed_s"] == 500.0
    assert merged["checks"]["preflight"] == {**check({}, "WARN"), "source": "b.json"}
    assert merged["checks"]["sustained_tv_eager"]["source"] == "a.json"
    assert merged["elapsed_s"] == 800.0 and merged["deadline_s"] == 1200.0
    assert merged["overrides"] == ["a=1", "b=2"]
    assert merged["ratios"][gpu_report.HEADLINE] == 7.5  # recomputed across the runs
    # merged again: the inner provenance stays
    again = gpu_report.merge([("ab.json", merged), ("c.json", run("H200", {}, 10.0))])
    assert again["checks"]["sustained_tv_eager"]["source"] == "a.json"
    assert set(again["sources"]) == {"a.json", "b.json", "ab.json", "c.json"}
    with pytest.raises(ValueError, match="not a gpu_check.json"):
        gpu_report.merge([("x.json", {"checks": {}})])


def test_upgrade_legacy_keeps_the_numbers():
    old = {
        "machine": {"gpu_name": "NVIDIA H200"},
        "checks": {
            "eager_dynamic_b64": {
                "status": "WARN",
                "figure": "415 img/s device",
                "run": 1,
                "images_per_s": 400.0,
                "wall_images_per_s": 460.0,
                "data_wait_pct": 50.0,
                "steps": 24,
                "warmup_steps": 1,
            },
            "cudagraphs_b64": {
                "status": "WARN",
                "figure": "3748 img/s device",
                "run": 1,
                "images_per_s": 4000.0,
                "wall_images_per_s": 3880.0,
                "data_wait_pct": 90.0,
                "steps": 24,
                "warmup_steps": 2,
            },
            "resume": {
                "status": "PASS",
                "figure": "steps 5-8",
                "run": "second run",
                "max_rel_diff": 0.0,
            },
        },  # fmt: skip
        "runs": [{"run": 1, "elapsed_s": 300.0}],
        "date": "2026-12-04",
    }
    new = gpu_report.upgrade_legacy(old, "gpu_check.json")
    assert list(new)[:6] == list(gpu_report.CONTRACT_KEYS)
    g = new["checks"]["cudagraphs_b64"]
    assert g["text"] == "3748 img/s device" and g["source"] == "gpu_check.json, run 1"
    assert g["figure"]["device_images_per_s"] == 4000.0
    assert g["figure"]["wall_images_per_s_median_interval"] == 3880.0  # not a throughput
    assert g["figure"]["wall_images_per_s_estimated"] == 400.0  # 4000 x (1 - 0.9)
    assert g["figure"]["steady_steps"] == 22
    assert "wall_images_per_s" not in g["figure"]
    assert new["checks"]["resume"]["figure"] == {"max_rel_diff": 0.0}
    assert new["ratios"]["wall_estimated_graphs_vs_tv_eager_b64"] == 2.0  # 400 / 200
    assert new["ratios"]["device_graphs_vs_tv_eager_b64"] == 10.0
    assert new["ratios"][gpu_report.HEADLINE] is None  # no sustained check: not measured
    assert "not sustained" in new["sources"]["gpu_check.json"]["note"]
    assert gpu_report.upgrade_legacy(new, "again") is new  # already in the contract's form


def test_render_sustained_result():
    checks = {
        "sustained_tv_eager": check(
            sustained(wall_images_per_s=400.0, device_images_per_s=500.0)
        ),  # fmt: skip
        "sustained_fixed_graphs_device": check(sustained()),
    }
    result = {**run("NVIDIA H100 80GB HBM3", checks, 500.0), "ratios": gpu_report.ratios(checks)}
    headline = gpu_report.render_headline(result)
    assert "**3,200 img/s by the wall clock, 8.0x torchvision's own eager training**" in headline
    assert "4,000 against 500 img/s (8.0x)" in headline  # the device-time ceiling beside it
    assert "16 host cores per GPU" in headline
    table = gpu_report.render_table(result)
    assert "| `sustained_fixed_graphs_device` | PASS | 3,200 | 4,000 | 3.0 | 203 | 4,096 |" in table
    assert "| `sustained_fixed_eager` | not measured |" in table


def test_replace_block_needs_its_markers():
    text = "a\n<!-- gpu_check:table -->\nold\n<!-- /gpu_check:table -->\nb\n"
    assert gpu_report.replace_block(text, "table", "new") == (
        "a\n<!-- gpu_check:table -->\nnew\n<!-- /gpu_check:table -->\nb\n"
    )
    with pytest.raises(ValueError, match="markers"):
        gpu_report.replace_block("no markers", "table", "new")


def test_committed_docs_are_the_render_of_the_committed_json():
    """README.md's headline and docs/bench.md's table are generated from docs/gpu_check.json:
    `python scripts/gpu_check.py --render docs/gpu_check.json --write` after a new run."""
    result = json.loads((REPO / "docs" / "gpu_check.json").read_text())
    assert list(result)[:6] == list(gpu_report.CONTRACT_KEYS)
    readme, bench = (REPO / "README.md").read_text(), (REPO / "docs" / "bench.md").read_text()
    assert gpu_report.render_docs(result, readme, bench) == (readme, bench)
    # the headline leads with the wall clock; the device-time ceiling stands beside it
    headline = gpu_report.render_headline(result)
    assert headline.index("wall clock") < headline.index("device-time ceiling")
