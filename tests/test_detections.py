"""Detections as pictures: eval/detections in TensorBoard, the drawing, show_detections.py."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssd_npu.evaluation.detections import CLASS_COLOURS, GT_COLOUR, PAD_VALUE, draw_tile, tile_grid
from ssd_npu.train import run
from tests.helpers import REPO, tiny_config, tiny_overrides

RUN = ("canvas=[128,128]", "max_boxes=8", "max_steps=2", "eval=true", "show.height=64")


@pytest.fixture(scope="module")
def trained(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-step run with the final evaluation: (run folder, summary)."""
    out = tmp_path_factory.mktemp("detections_run")
    return out, run(tiny_config(tiny_coco, out, *RUN))


def test_evaluation_logs_detection_images(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["images"] if t.startswith("eval/") and "detections" in t]
    assert tags, acc.Tags()["images"]
    events = acc.Images(tags[0])
    assert [e.step for e in events] == [summary["global_step"]] == [2]
    picture = Image.open(io.BytesIO(events[-1].encoded_image_string))
    # 6 val images in 2 rows of 3 tiles 64 px high, 4 px around each; the synthetic images'
    # sides are 160 to 800 px, so a tile is 64 / 5 to 64 x 5 px wide
    assert picture.size == (events[-1].width, events[-1].height)
    assert picture.height == 2 * (64 + 4) + 4
    assert 3 * 12 + 16 <= picture.width <= 3 * 320 + 16


def test_tile_draws_ground_truth_and_predictions_above_the_score() -> None:
    grey = torch.full((3, 100, 150), 90, dtype=torch.uint8)
    gt = torch.tensor([[10.0, 20.0, 60.0, 70.0]])
    boxes = torch.tensor([[80.0, 30.0, 140.0, 90.0], [5.0, 5.0, 40.0, 40.0]])
    scores, labels = torch.tensor([0.9, 0.1]), torch.tensor([2, 3])
    tile = draw_tile(grey, gt, boxes, scores, labels, {2: "square"}, score=0.3, height=100)
    assert tile.shape == (3, 100, 150) and tile.dtype == torch.uint8
    pixel = lambda y, x: tuple(tile[:, y, x].tolist())  # noqa: E731
    assert pixel(20, 10) == pixel(70, 35) == GT_COLOUR  # on the ground-truth edges
    assert pixel(45, 35) == (90, 90, 90)  # inside: untouched
    assert pixel(60, 140) == CLASS_COLOURS[2]  # the prediction above the score, its class colour
    assert pixel(40, 40) == (90, 90, 90)  # the one below the score: not drawn
    assert pixel(5, 20) == (90, 90, 90)
    # no predictions above the score: the ground truth alone still differs from the image
    bare = draw_tile(grey, gt, boxes, scores, labels, {}, score=1.0, height=50)
    assert bare.shape == (3, 50, 75)
    assert tuple(bare[:, 10, 5].tolist()) == GT_COLOUR and (bare != 90).sum() > 0
    assert (bare[:, 50 // 2, 40:] == 90).all()  # right of the box: only the image
    grid = tile_grid([tile, tile[:, :, :80], tile])  # one height; rows of 2, 4 px around each
    assert grid.shape == (3, 2 * (100 + 4) + 4, 4 + 150 + 4 + 80 + 4) and grid.dtype == torch.uint8
    assert torch.equal(grid[:, 4:104, 4:154], tile) and torch.equal(grid[:, 108:208, 4:154], tile)
    assert (grid[:, 108:208, 158:] == PAD_VALUE).all()  # the short second row: padded


@pytest.mark.slow
def test_show_detections_writes_a_png(trained: tuple[Path, dict], tiny_coco: Path, tmp_path):
    out, summary = trained
    png = tmp_path / "sheet.png"
    args = [
        *tiny_overrides(tiny_coco, *RUN),
        f"weights={summary['checkpoint']}",
        f"show.out={png}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(
        [sys.executable, "scripts/show_detections.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(png)
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.height == 2 * (64 + 4) + 4


def test_show_detections_needs_weights(tiny_coco: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "scripts/show_detections.py",
            *tiny_overrides(tiny_coco),
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "weights" in done.stderr and "weights=PATH" in done.stderr
