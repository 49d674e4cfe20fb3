"""docs/parity.json (a converge.json, the machine it ran on, a note) and the parity table of
docs/demo.md, rendered from it.

Usage:
    python -m ssd_npu.tools.parity --from outputs/converge/converge.json --note "..."
        [--accelerator "one NVIDIA H100"]
        # writes docs/parity.json (with "machine") and the table in docs/demo.md
    python -m ssd_npu.tools.parity   # the table in docs/demo.md again, from docs/parity.json

The table sits in docs/demo.md between BEGIN and END (tests/test_parity_doc.py checks that
it is what `render(docs/parity.json)` gives).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PARITY = REPO / "docs" / "parity.json"
DOC = REPO / "docs" / "demo.md"
BEGIN = "<!-- parity table: generated from docs/parity.json by python -m ssd_npu.tools.parity -->"
END = "<!-- end of the generated parity table -->"
METRICS = ("mAP", "mAP50")


def machine(accelerator: str | None) -> dict[str, Any]:
    """Where the runs were measured: CPU model, cores, `accelerator` (as the caller names it,
    e.g. "one NVIDIA H100"; None: the runs trained on the CPU), library versions, date."""
    import torch
    import torchvision

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "accelerator": accelerator,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def _cell(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def render(parity: dict[str, Any]) -> str:
    """The markdown table of a parity record: each path's runs seed by seed, its mean ± std
    over seeds, the paired difference's mean ± std and its 95% bootstrap interval."""
    runs, paths = parity["runs"], list(parity["paths"])
    lines = ["| path | seed | mAP | mAP50 |", "|---|---|---|---|"]
    for path in paths:
        rows = [r for r in runs if r["path"] == path]
        seeds = " / ".join(str(r["seed"]) for r in rows)
        cells = [_cell([r[m] for r in rows]) for m in METRICS]
        lines.append(f"| {path} | {seeds} | {cells[0]} | {cells[1]} |")
    for path in paths:
        stats = parity["paths"][path]
        cells = [f"{stats[m]['mean']:.3f} ± {stats[m]['std']:.3f}" for m in METRICS]
        lines.append(f"| {path} | mean ± std | {cells[0]} | {cells[1]} |")
    name, diff = f"{paths[0]} - {paths[1]}", parity["difference"]
    cells = [f"{diff[m]['mean']:+.3f} ± {diff[m]['std']:.3f}" for m in METRICS]
    lines.append(f"| {name} | paired mean ± std | {cells[0]} | {cells[1]} |")
    cells = ["**[{:+.3f}, {:+.3f}]**".format(*diff[m]["ci95"]) for m in METRICS]
    lines.append(f"| {name} | **95% CI (bootstrap)** | {cells[0]} | {cells[1]} |")
    m, seeds = parity["machine"], len(diff["mAP50"]["seeds"])
    where = m["accelerator"] or f"CPU only ({m['cores']} cores: {m['cpu']})"
    lines += [
        "",
        f"{seeds} paired seeds, stopped by `{parity.get('stopped_by')}`, mAP50 half-width "
        f"{parity.get('halfwidth', 0.0):.3f}; {where}, torch {m['torch']}, {m['date']}.",
    ]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """`text` with the block between BEGIN and END replaced by `table`."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{table}\n{text[end:]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="a converge.json to commit")
    parser.add_argument("--note", default="", help="what the runs were (kept in the record)")
    parser.add_argument("--accelerator", help="the device the runs trained on; none: the CPU")
    args = parser.parse_args(argv)
    if args.source is not None:
        record = json.loads(args.source.read_text())
        record.update(machine=machine(args.accelerator), note=args.note)
        PARITY.write_text(json.dumps(record, indent=2) + "\n")
    table = render(json.loads(PARITY.read_text()))
    DOC.write_text(replace_table(DOC.read_text(), table))
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
