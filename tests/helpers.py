"""Helpers shared by the test files (a plain module: test files import from here, never from
each other). Shared pytest fixtures live in tests/conftest.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torchvision.ops import box_iou

from ssd_npu.build import Training
from ssd_npu.config import config_dir, expand_short_forms, register_configs
from ssd_npu.data.batch import Batch
from ssd_npu.engine.loop import Hook, Progress, TrainLoop
from ssd_npu.engine.telemetry import Telemetry, read_scalar_series
from ssd_npu.tools.op_recorder import Key, OpRecorder, Signature

REPO = Path(__file__).resolve().parents[1]
register_configs()

# A small, quick run on the tiny set: 128 px canvas, 8 target rows, no evaluation.
FAST = ("canvas=[128,128]", "max_boxes=8", "eval=false")


def compose_cfg(*overrides: str, config: str = "train"):
    """A config composed through Hydra with `overrides` (the command line's words): train.py's,
    or a script's (`config="audit"`: configs/audit.yaml)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config, overrides=expand_short_forms(list(overrides)))


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


def tiny_config(root: Path, out: Path, *overrides: str, config: str = "train"):
    """A tiny CPU config on the synthetic set at `root` (read as COCO, 6 classes), writing to
    `out`. Tests take the `tiny_cfg` fixture (TinyCfg) instead; this is for code that cannot:
    module-scoped fixtures, workers in another process."""
    return compose_cfg(*tiny_overrides(root, f"out_dir={out}", *overrides), config=config)


@dataclass(frozen=True)
class TinyCfg:
    """What the `tiny_cfg` fixture (tests/conftest.py) gives a test: tiny CPU configs on the
    session's `tiny_coco` set, writing to the test's `tmp_path` unless told otherwise."""

    root: Path
    tmp_path: Path

    def __call__(
        self, *overrides: str, out: Path | None = None, config: str = "train"
    ) -> DictConfig:
        """The config `config` (train.py's, or a script's: "audit") composed with the tiny
        overrides, `out_dir=out` (the test's tmp_path when `out` is None), then `overrides`."""
        return tiny_config(self.root, out or self.tmp_path, *overrides, config=config)


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python train.py <args>` in the checkout; output captured as text."""
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(out: Path) -> dict[int, float]:
    """loss/total of the run in `out` (its TensorBoard events), by step."""
    steps, values = read_scalar_series(out, "loss/total")["loss/total"]
    return dict(zip(steps, values, strict=True))


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


@contextmanager
def recorded_step(recorder: OpRecorder) -> Iterator[dict[Key, list[Signature]]]:
    """Record what runs in the block as one step of `recorder`: yields `recorder.steps[-1]`,
    {(kind, site, aten op): [(input shapes, output shapes) per call]}, filled as ops run."""
    recorder.start_step()
    try:
        yield recorder.steps[-1]
    finally:
        recorder.end_step()  # never leave the dispatch modes pushed, even if the step failed


def op_calls(step: dict[Key, list[Signature]]) -> int:
    """How many op calls a recorded step made (all its keys' calls)."""
    return sum(len(calls) for calls in step.values())


def host_syncs(recorder: OpRecorder, step: dict[Key, list[Signature]]) -> list[str]:
    """The aten ops of a recorded step that make the host wait for the device, one per call
    (`.item()` is "aten::_local_scalar_dense"; see op_recorder.sync_reason)."""
    return [key[2] for key, calls in step.items() if key in recorder.syncs for _ in calls]


def train_loop(t: Training, out: Path, hooks: Sequence[Hook] = ()) -> TrainLoop:
    """The TrainLoop train.py builds from `t` (without its device prefetcher: the loader's
    batches are moved by `run_step`); its telemetry writes nothing (`out` is never written)."""
    return TrainLoop(
        t.step,
        t.optimizer,
        t.scheduler,
        t.data.train,
        t.data.train_sampler,
        t.device,
        Telemetry(out, 0, enabled=False),
        hooks,
        scaler=t.scaler,
        world=t.world,
        optimizer_step=t.optimizer_step,
    )


def train_step(loop: TrainLoop, batch: Batch, progress: Progress) -> dict[str, float]:
    """One optimizer step on `batch` exactly as the loop runs it (`run_step`), read back at
    once (`finish`): the losses by name, "total" first (non-finite ones raise NonFiniteLoss).
    The hooks' `after_update` (the loop asks it when to read) is not called: for loops whose
    hooks only watch `after_step`."""
    record = loop.run_step(batch, progress)
    loop.finish(record, progress)
    return record.values


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


def assert_bitwise_equal(
    first: tuple[dict[str, torch.Tensor], list[torch.Tensor]],
    second: tuple[dict[str, torch.Tensor], list[torch.Tensor]],
) -> None:
    """Two (losses, gradients) results are the same to the bit (e.g. with garbage padding
    rows and with zeroed ones)."""
    for key in first[0]:
        assert torch.equal(first[0][key], second[0][key]), key
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


def compact_matches(matched: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """matched [B, A] indices into the padded rows M (negative: not a box) -> indices into
    each image's valid rows only, as torchvision numbers its unpadded targets."""
    compact = torch.cumsum(valid, dim=1) - 1  # [B, M]: the valid row's place among the valid
    mapped = torch.gather(compact, 1, matched.clamp(min=0))
    return torch.where(matched >= 0, mapped, matched)


def assert_close_to_reference(
    ours: dict[str, torch.Tensor],
    grads: list[torch.Tensor],
    ref: dict[str, torch.Tensor],
    ref_leaves: list[torch.Tensor],
) -> None:
    """A fixed loss's values and gradients equal torchvision's (`ref`, and the `.grad` of the
    leaves it was computed from) to the rounding of their dtype; every gradient finite."""
    dtype = ref_leaves[0].dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **tol)
    for mine, leaf in zip(grads, ref_leaves, strict=True):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, leaf.grad, **tol)


def assert_same_ops_every_step(recorder: OpRecorder) -> None:
    """The recorded steps ran the same ops with the same shapes (forward and backward, more
    than a trivial count), and none of them synced with the host."""
    first = recorder.steps[0]
    assert op_calls(first) > 50 and {kind for kind, _, _ in first} == {"fwd", "bwd"}
    assert all(step == first for step in recorder.steps[1:])
    assert recorder.syncs == {}  # no .item(), nonzero, unique or boolean-mask indexing
