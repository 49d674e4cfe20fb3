"""docs/parity.json (the committed whole-run comparison) and the table docs/demo.md shows."""

from __future__ import annotations

import json

from ssd_npu.tools import parity


def test_demo_md_shows_the_table_of_parity_json():
    record = json.loads(parity.PARITY.read_text())
    assert {"runs", "paths", "difference", "config", "machine", "stopped_by"} <= set(record)
    text = parity.DOC.read_text()
    block = text[text.index(parity.BEGIN) + len(parity.BEGIN) : text.index(parity.END)]
    assert (
        block.strip() == parity.render(record).strip()
    )  # regenerate: python -m ssd_npu.tools.parity


def test_render_lists_each_path_and_the_interval():
    runs = [{"path": p, "seed": s, "mAP": 0.5, "mAP50": v, "wall_s": 1.0}
            for s, (a, b) in enumerate([(0.7, 0.8), (0.9, 0.8)])
            for p, v in (("fixed", a), ("dynamic", b))]  # fmt: skip
    stats = {"mean": 0.8, "std": 0.1}
    diff = {"mean": 0.0, "std": 0.14, "ci95": [-0.1, 0.1], "seeds": [0, 1]}
    record = {
        "runs": runs,
        "paths": {p: {"mAP": stats, "mAP50": stats} for p in ("fixed", "dynamic")},
        "difference": {"mAP": diff, "mAP50": diff},
        "stopped_by": "seeds",
        "halfwidth": 0.1,
        "machine": {"accelerator": None, "cores": 2, "cpu": "x", "torch": "2", "date": "d"},
    }
    table = parity.render(record)
    assert "| fixed | 0 / 1 | 0.500 / 0.500 | 0.700 / 0.900 |" in table
    assert "| fixed - dynamic | **95% CI (bootstrap)** | **[-0.100, +0.100]** |" in table
    assert "2 paired seeds, stopped by `seeds`" in table and "CPU only (2 cores: x)" in table
    assert parity.replace_table(f"a\n{parity.BEGIN}\nold\n{parity.END}\nb", "new") == (
        f"a\n{parity.BEGIN}\nnew\n{parity.END}\nb"
    )
