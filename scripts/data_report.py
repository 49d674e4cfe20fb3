"""Choose canvas, fit and max_boxes from the data: a dynamicity report of the annotation file.

Usage:
    python scripts/data_report.py [data=coco data.root=/path/to/coco] [canvas=[H,W]]
        [batch_size=N] [report.out=PATH] [report.png=true] [data.train_split=train2017]

Reads only `annotations/instances_<train_split>.json` (pycocotools; no image is decoded, so
COCO train2017 takes seconds) and prints: image sizes and aspect ratios, boxes per image as
training targets (crowd and degenerate boxes filtered as the loader does), what each
candidate max_boxes truncates and pads, box sizes on the canvas under each fit (and how many
fall below the smallest anchor or 1 px), and a recommendation. Writes `data_report.json`
into the run folder (or to `report.out`); `report.png=true` adds histograms (needs
matplotlib). Exit status 0; 2 on a bad config value or missing data.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import config_dir  # noqa: E402


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="report")
def main(cfg: DictConfig) -> None:
    from ssd_npu.build import resolve_data_root
    from ssd_npu.config import validate
    from ssd_npu.tools.data_report import data_report
    from ssd_npu.tools.report_render import format_report, save_pngs, write_report

    out_dir = run_folder(cfg)
    with user_errors():
        validate(cfg)
        ann_file = resolve_data_root(cfg) / "annotations" / f"instances_{cfg.data.train_split}.json"
        report = data_report(
            ann_file, tuple(cfg.canvas), cfg.data.num_classes, cfg.batch_size, cfg.model.name
        )
    path = write_report(report, cfg.report.out or out_dir / "data_report.json")
    print(format_report(report))
    print(f"\nreport: {path}")
    if cfg.report.png:
        pngs = save_pngs(ann_file, report, path.parent)
        print("histograms: " + (", ".join(map(str, pngs)) or "skipped (matplotlib not installed)"))


if __name__ == "__main__":
    expand_argv()
    main()
