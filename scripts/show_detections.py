"""Draw a checkpoint's detections on the first val images: one PNG grid.

Usage:
    python scripts/show_detections.py weights=PATH [show.out=PATH] [show.images=6]
        [show.score=0.3] [show.height=256] [any train.py override: data=coco data.root=...]

Builds the pipeline exactly as `python train.py` would with the same overrides, runs the
checkpoint on the first `show.images` val images as evaluation does (`shape=fixed`: on the
canvas, boxes mapped back to the original images; `shape=dynamic`: torchvision's inference),
and draws ground truth (thin, white) and predictions with score >= `show.score` (a colour
per class, "name score") on the original images: the picture TensorBoard shows as
`eval/detections`. Writes `detections.png` into the run folder (or `show.out`) and prints
its path. Exit status 2 on a bad config value (weights missing included).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import config_dir  # noqa: E402
from ssd_npu.errors import ConfigError  # noqa: E402


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    from ssd_npu.build import build_evaluator, build_training, detection_sheet
    from ssd_npu.evaluation.detections import save_png

    out_dir = run_folder(cfg)
    with user_errors():
        if not cfg.weights:
            raise ConfigError(
                "weights is not set; give weights=PATH, the checkpoint to draw "
                "(e.g. weights=outputs/<date>/<time>/checkpoints/<step>.pt)."
            )
        t = build_training(cfg)
        sheet = detection_sheet(cfg, t, build_evaluator(cfg, t))
        path = save_png(sheet.render(), cfg.show.out or out_dir / "detections.png")
    print(path)


if __name__ == "__main__":
    expand_argv()
    main()
