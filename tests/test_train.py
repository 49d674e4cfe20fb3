"""End to end through Hydra's compose API: train a few steps, read back what was written."""

import json
from pathlib import Path

import pytest
import torch

from ssd_npu.build import build_training
from ssd_npu.engine.loop import Progress
from ssd_npu.engine.telemetry import read_scalar_series
from ssd_npu.tools.op_recorder import OpRecorder
from ssd_npu.train import run
from tests.helpers import FAST, op_calls, recorded_step, train_loop, train_step

TAGS = {
    "time/step_ms",
    "time/data_ms",
    "throughput/images_per_s",
    "loss/total",
    "loss/bbox_regression",
    "loss/classification",
    "lr",
    "data/boxes_dropped",
    "eval/mAP",
    "eval/mAP50",
    "time/eval_stall_s",
}
SUMMARY_KEYS = {
    "steps",
    "warmup_steps",
    "steady_step_ms",
    "steady_images_per_s",
    "first_step_ms",
    "graphs_compiled",
    "recompiles",
    "boxes_dropped",
    "final_loss",
    "device",
    "shape",
    "canvas",
    "max_boxes",
    "eval",
}


def test_few_step_run_writes_events_and_summary(tiny_cfg, tmp_path):
    cfg = tiny_cfg("canvas=[128,160]", "max_boxes=3", "fit=letterbox", "max_steps=4")
    returned = run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    assert set(summary) >= SUMMARY_KEYS
    assert summary["steps"] == 4 and summary["shape"] == "fixed"
    assert summary["canvas"] == [128, 160] and summary["max_boxes"] == 3
    assert summary["graphs_compiled"] is None and summary["device"] == "cpu"
    assert 0 <= summary["warmup_steps"] <= 4 and summary["steady_step_ms"] > 0
    assert 0.0 <= summary["eval"]["mAP"] <= 1.0
    (entry,) = summary["eval"]["history"]  # where the evaluation's time went, in seconds
    assert all(entry[k] >= 0 for k in ("forward_s", "records_s", "cocoeval_s", "stall_s"))
    assert summary["boxes_dropped"] > 0  # max_boxes=3 on images with up to ~30 objects
    assert set(summary["data_counts"]) == {
        "degenerate", "clipped", "skipped", "downscaled", "host_decoded"
    }  # fmt: skip

    scalars = read_scalar_series(tmp_path, "loss/total")
    assert set(scalars) >= TAGS
    assert scalars["time/step_ms"][0] == [1, 2, 3, 4]
    assert scalars["loss/total"][1][-1] == pytest.approx(summary["final_loss"])
    assert sum(scalars["data/boxes_dropped"][1]) == summary["boxes_dropped"]
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "step_0000004.pt")
    assert Path(summary["checkpoint"]).is_file()


def test_anchors_follow_the_canvas(tiny_cfg):
    small = build_training(tiny_cfg("canvas=[256,256]"))
    wide = build_training(tiny_cfg("canvas=[256,384]"))
    assert small.model.anchors.shape[0] < wide.model.anchors.shape[0]
    assert small.model.anchors[:, 2].max() <= 256 * 1.5
    assert wide.model.anchors[:, 2].max() > 300  # anchors reach across the wider canvas


def test_fixed_step_shapes_never_change(tiny_cfg, tmp_path):
    """Batches of different original sizes and box counts: identical device-side shapes."""
    t = build_training(tiny_cfg("canvas=[128,128]", "max_boxes=8"))
    loop, progress, recorder = train_loop(t, tmp_path), Progress(), OpRecorder()
    originals, counts = set(), set()
    for i, batch in enumerate(t.data.train):
        if i == 4:
            break
        originals.update(tuple(s) for s in batch.orig_sizes.tolist())
        counts.update(batch.valid.sum(1).tolist())
        with recorded_step(recorder):  # the step as queued; its losses are read after
            record = loop.run_step(batch, progress)
        loop.finish(record, progress)
    assert len(originals) >= 4 and len(counts) >= 3  # the inputs really differ
    # Step 0 is not compared: SGD creates its momentum buffers on its first step only.
    steps = recorder.steps[1:]
    assert op_calls(steps[0]) > 1000  # forward, loss, backward and optimizer ops
    assert {kind for kind, _, _ in steps[0]} == {"fwd", "bwd"}
    assert steps[0] == steps[1] == steps[2]  # every op, site and shape, call by call
    assert recorder.syncs == {}  # no .item(), nonzero, mask indexing or device-to-host copy


def test_amp_bf16_on_cpu_steps_in_bf16(tiny_cfg, tmp_path):
    """amp=true on the cpu: bf16 autocast, no scaler, NCHW weights; one step's losses are
    bf16's rounding of the fp32 ones (equal: autocast was off; far: something else changed)."""
    step_losses = {}
    for amp in ("false", "true"):
        t = build_training(tiny_cfg(*FAST, "augment=false", f"amp={amp}"))
        step_losses[amp] = train_step(train_loop(t, tmp_path), next(iter(t.data.train)), Progress())
    # t: the amp=true build
    assert t.scaler is None  # bf16 needs no gradient scaler
    conv = next(m.weight for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.is_contiguous()  # device.channels_last=null: NCHW under amp (see build.py)
    with t.device.autocast(True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    for key, fp32 in step_losses["false"].items():
        assert step_losses["true"][key] != fp32, key
        assert step_losses["true"][key] == pytest.approx(fp32, rel=0.05), key


@pytest.mark.slow  # 18 steps (~11 s); the test above covers the bf16 step itself
def test_amp_bf16_on_cpu_trains_and_the_loss_falls(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "canvas=[128,128]", "max_boxes=8", "amp=true", "eval=false", "augment=false",
        "max_steps=18", "optim.lr=0.01", "optim.warmup_steps=0",
    )  # fmt: skip
    summary = run(cfg)
    losses = read_scalar_series(tmp_path, "loss/total")["loss/total"][1]
    assert len(losses) == 18 and torch.isfinite(torch.tensor(losses)).all()
    # Mean loss per epoch (6 batches of the same 12 images): it falls epoch after epoch.
    epochs = [sum(losses[i : i + 6]) / 6 for i in (0, 6, 12)]
    assert epochs[0] > epochs[1] > epochs[2] and epochs[2] < 0.9 * epochs[0]
    assert summary["final_loss"] == pytest.approx(losses[-1])


def test_eval_only_shows_no_training_progress_bar(tiny_cfg, tmp_path, capsys):
    trained = tmp_path / "trained"
    run(tiny_cfg(*FAST, "max_steps=1", out=trained))
    shown = capsys.readouterr()
    assert "step/s" in shown.err  # control: a training run's bar is captured here
    weights = trained / "checkpoints" / "step_0000001.pt"
    summary = run(
        tiny_cfg("canvas=[128,128]", "max_boxes=8", "eval_only=true", f"weights={weights}",
                 out=tmp_path / "eval")
    )  # fmt: skip
    shown = capsys.readouterr()
    printed = shown.out + shown.err
    assert "step/s" not in printed and "0step" not in printed
    assert "Average Precision" in shown.out  # it did evaluate (COCOeval's table)
    assert summary["global_step"] == 0 and 0.0 <= summary["eval"]["mAP"] <= 1.0


def test_channels_last_weights_on_cpu_give_the_same_losses(tiny_cfg, tmp_path):
    """device.channels_last (default on for cpu): the layout changes, the losses do not."""
    convs = {}
    step_losses = {}
    for setting in ("null", "true", "false"):
        t = build_training(tiny_cfg(*FAST, f"device.channels_last={setting}"))
        weight = next(m.weight for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
        convs[setting] = weight.is_contiguous(memory_format=torch.channels_last)
        loop = train_loop(t, tmp_path)
        step_losses[setting] = train_step(loop, next(iter(t.data.train)), Progress())
    assert convs == {"null": True, "true": True, "false": False}
    assert set(step_losses["true"]) == {"total", "bbox_regression", "classification"}
    for key, value in step_losses["false"].items():
        assert step_losses["true"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
