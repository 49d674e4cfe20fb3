"""Helpers shared by the test files (a plain module: test files import from here, never from
each other). Shared pytest fixtures live in tests/conftest.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import box_iou

from ssd_npu.config import config_dir, expand_short_forms, register_configs

REPO = Path(__file__).resolve().parents[1]
register_configs()

# A small, quick run on the tiny set: 128 px canvas, 8 target rows, no evaluation.
FAST = ("canvas=[128,128]", "max_boxes=8", "eval=false")


def compose_cfg(*overrides: str):
    """The train config composed through Hydra with `overrides` (the command line's words)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=expand_short_forms(list(overrides)))


def tiny_overrides(root: Path, *overrides: str) -> list[str]:
    """CPU overrides for the session's synthetic set at `root` (read as COCO, 6 classes)."""
    return [
        "device=cpu",
        "data=coco",  # tiny_coco is a finished COCO-format folder: read it as is
        f"data.root={root}",
        "data.num_classes=6",
        "batch_size=2",
        "num_workers=0",
        *overrides,
    ]


def tiny_cfg(root: Path, out: Path, *overrides: str):
    """A tiny CPU config on the session's synthetic set (read as COCO, 6 classes)."""
    return compose_cfg(*tiny_overrides(root, f"out_dir={out}", *overrides))


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python train.py <args>` in the checkout; output captured as text."""
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_scalars(out: Path) -> dict[str, list]:
    """Every TensorBoard scalar series written under `out`/tensorboard, by tag."""
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def losses(out: Path) -> dict[int, float]:
    """loss/total of a run, by step."""
    return {e.step: e.value for e in read_scalars(out)["loss/total"]}


def torchvision_loss(model, anchors, cls_logits, bbox_regression, targets):
    """Exactly what SSD.forward does in training after the head: match, then compute_loss."""
    matched_idxs = []
    for target in targets:
        if target["boxes"].numel() == 0:
            matched_idxs.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64))
            continue
        matched_idxs.append(model.proposal_matcher(box_iou(target["boxes"], anchors)))
    head = {"cls_logits": cls_logits, "bbox_regression": bbox_regression}
    return model.compute_loss(targets, head, [anchors] * len(targets), matched_idxs), matched_idxs


class DeviceShapes(TorchDispatchMode):
    """Records (op, input shapes, output shapes) of every op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def shapes(values):
            flat = torch.utils._pytree.tree_leaves(values)
            return tuple(tuple(v.shape) for v in flat if isinstance(v, torch.Tensor))

        self.ops.append((str(func), shapes((args, kwargs)), shapes(out)))
        return out


def train_step(t, batch) -> dict[str, torch.Tensor]:
    """One optimizer step of a built `Training` on `batch`, as the loop runs it (no hooks)."""
    batch_losses = t.step(batch)
    t.optimizer.zero_grad(set_to_none=True)
    sum(batch_losses.values()).backward()
    t.optimizer.step()
    return batch_losses


def calibrate_batchnorm(model, loader) -> None:
    """Give an untrained model image-dependent outputs: BatchNorm running stats from `loader`.

    With fresh running stats (mean 0, var 1) an untrained SSDLite's eval-mode features decay to
    ~1e-13, every image gets the same detections and a comparison would prove nothing.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in loader:
            model(batch.images)
    for m in norms:
        m.momentum = 0.03  # torchvision ssdlite's BatchNorm momentum
