"""Output of the data report: console text, the JSON file and the PNG histograms.

The statistics are computed in `ssd_npu.tools.data_report` and the recommendation in
`ssd_npu.tools.recommend`; this module only renders a finished report dict (and, for the
histograms, re-reads the annotation file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ssd_npu.data.box_table import box_table, load_coco
from ssd_npu.tools.data_report import fit_scales


def format_report(r: dict[str, Any]) -> str:
    """The report as console text: a few short tables and the recommendation."""
    s, b = r["image_shapes"], r["boxes_per_image"]

    def pcts(d: dict[str, float]) -> str:
        return "  ".join(f"{k}={v:g}" for k, v in d.items())

    lines = [
        f"{r['ann_file']}: {r['images']} images, {r['boxes']} training boxes "
        f"({r['crowd_filtered']} crowd and {r['degenerate_filtered']} degenerate filtered)",
        f"image shapes: {s['distinct']} distinct; most common (h, w, n): {s['most_common']}",
        f"  height px   {pcts(s['height_px'])}",
        f"  width px    {pcts(s['width_px'])}",
        f"  aspect W/H  {pcts(s['aspect_w_over_h'])}",
        f"boxes per image: {pcts(b)}",
        "",
        f"{'max_boxes':>9} {'imgs truncated %':>17} {'boxes dropped %':>16} {'padding rows %':>15}",
    ]
    lines += [
        f"{m['max_boxes']:>9} {m['images_truncated_pct']:>17} {m['boxes_dropped_pct']:>16} "
        f"{m['padding_rows_pct']:>15}"
        for m in r["max_boxes"]
    ]
    lines += [
        "",
        f"{'canvas':>10} {'fit':>9} {'box p10':>7} {'p50':>6} {'<anchor %':>9} {'<1px %':>7} "
        f"{'padding %':>9} {'distort p90':>11} {'downscaled %':>12}",
    ]
    for f in r["fits"]:
        c = f"{f['canvas'][0]}x{f['canvas'][1]}"
        lines.append(
            f"{c:>10} {f['fit']:>9} {f['box_size_px']['p10']:>7.1f} {f['box_size_px']['p50']:>6.1f} "
            f"{f['below_smallest_anchor_pct']:>9} {f['below_1px_pct']:>7} {f['padding_pct']:>9} "
            f"{f['distortion_p90']:>11} {f['images_downscaled_pct']:>12}"
        )
    anchor = ", ".join(
        f"{f['canvas'][0]}x{f['canvas'][1]}: {f['smallest_anchor_px']} px" for f in r["fits"][::3]
    )
    rec, bk = r["recommendation"], r["buckets"]
    lines += [
        f"(box sizes sqrt(w*h) canvas px; smallest anchor {anchor})",
        "",
        f"buckets {bk['sizes']}: images per bucket {bk['images']}, "
        f"{bk['images_unused_per_epoch']} unused per epoch at batch_size={bk['batch_size']}",
        "",
        f"recommendation: {rec['overrides']}",
        f"  max_boxes={rec['max_boxes']}: {rec['max_boxes_reason']}",
        f"  max_boxes=[{','.join(map(str, rec['buckets']))}]: {rec['buckets_reason']}",
        f"  canvas={rec['canvas']} fit={rec['fit']}: {rec['fit_reason']}",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def save_pngs(ann_file: str | Path, report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Histograms (boxes per image, aspect ratio, box size under the recommended fit) as PNGs.

    matplotlib is optional: without it, returns [] and the caller says so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    t = box_table(load_coco(ann_file))
    rec = report["recommendation"]
    sx, sy, _ = fit_scales(t.heights, t.widths, tuple(rec["canvas"]), rec["fit"])
    size = np.sqrt(t.box_wh[:, 0] * sx[t.box_image] * t.box_wh[:, 1] * sy[t.box_image])
    plots = {
        "boxes_per_image.png": (t.counts, "boxes per image (after filtering)"),
        "aspect_ratio.png": (t.widths / t.heights, "image aspect ratio W/H"),
        "box_size.png": (size, f"box size sqrt(w*h), canvas px ({rec['fit']} {rec['canvas']})"),
    }
    out = []
    for name, (values, label) in plots.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(values, bins=50)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        if name == "boxes_per_image.png":
            ax.axvline(rec["max_boxes"], color="r", label=f"max_boxes={rec['max_boxes']}")
            ax.legend()
        fig.tight_layout()
        out.append(Path(out_dir) / name)
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
