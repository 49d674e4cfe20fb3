"""optim.ema: the weight average's update, its checkpoint round trip and its evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ssd_npu.build import build_evaluator, build_training
from ssd_npu.config import validate
from ssd_npu.engine.checkpoint import list_checkpoints, load_checkpoint
from ssd_npu.engine.ema import WeightAverage, on_averaged_weights
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.cocoeval import coco_map
from ssd_npu.train import run
from tests.helpers import FAST


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("buffers", [False, True])
def test_update_is_the_exponential_average(buffers):
    model, decay = _tiny(), 0.9
    average = WeightAverage(model, decay, buffers=buffers)
    average.update()  # the first update copies
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))  # training mode: BatchNorm's running stats move
        average.update()
        for k, v in model.state_dict().items():
            if k in expected:
                averaged = buffers or "running_" not in k  # buffers=False: copied
                expected[k] = decay * expected[k] + (1 - decay) * v if averaged else v.clone()
    got = average.averaged.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert average.updates == 4


def test_applied_swaps_the_average_in_and_back():
    model = _tiny()
    average = WeightAverage(model, 0.5)
    average.update()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    weight_id = id(model[0].weight)
    with average.applied():
        assert id(model[0].weight) == weight_id  # the module's own tensors, changed in place
        torch.testing.assert_close(model[0].weight, trained["0.weight"] - 0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_bad_decay_names_the_key(tiny_cfg):
    with pytest.raises(ConfigError, match=r"optim.ema=1.0 is not valid"):
        validate(tiny_cfg(*FAST, "optim.ema=1.0"))


def test_checkpoint_round_trip_gives_the_same_average(tiny_cfg, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    ema = "optim.ema=0.6"
    first = run(tiny_cfg(*FAST, ema, "max_steps=6", out=straight))
    assert first["ema"] == 0.6
    run(tiny_cfg(*FAST, ema, "max_steps=3", out=split))
    run(tiny_cfg(*FAST, ema, "max_steps=6", "resume=auto", out=split))
    want = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])["ema"]
    got = load_checkpoint(list_checkpoints(split / "checkpoints")[-1])["ema"]
    assert int(got["n_averaged"]) == 6 and set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", ["fixed", "dynamic"])
def test_evaluation_uses_the_averaged_weights(tiny_cfg, tmp_path, shape):
    cfg = tiny_cfg(*FAST, "optim.ema=0.5", "max_steps=4", "eval=true", f"shape={shape}")
    summary = run(cfg)
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}

    t = build_training(cfg)
    evaluator = build_evaluator(cfg, t)
    t.model.load_state_dict(state["model"])
    raw = evaluator.detections(t.data.val).results  # [N, 7] records of the trained weights
    average = WeightAverage(t.model, 0.5)
    average.load_state_dict(state["ema"])
    found = on_averaged_weights(evaluator.detections, average)(t.data.val)
    through_average = found.results
    assert not np.array_equal(raw, through_average)  # the averaged weights detect differently
    again = evaluator.detections(t.data.val).results  # the trained weights are back
    assert np.array_equal(again, raw)
    t.model.load_state_dict(averaged)  # a manual evaluation of the averaged state dict
    manual = evaluator.detections(t.data.val).results
    assert np.array_equal(manual, through_average)
    got = coco_map(t.data.val_set.coco, manual, found.image_ids, cfg.eval.coco)
    assert summary["eval"]["mAP50"] == got["mAP50"] and summary["eval"]["mAP"] == got["mAP"]
    assert json.loads((tmp_path / "summary.json").read_text())["ema"] == 0.5
